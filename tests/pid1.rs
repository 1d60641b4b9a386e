//! drainit as the container's PID 1 (in a fresh PID namespace) and as a child subreaper: every
//! orphan is reaped, signals sent to PID 1 work, exit codes come back out.

mod common;

use std::time::Duration;

use common::{Drainit, command, demo, first_child, is_running, parent_of, time_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// drainit as PID 1 of a new PID namespace, as in a container.
fn as_pid1(options: &[&str], app: common::App) -> Drainit {
    Drainit::builder()
        .under(&["unshare", "--pid", "--fork", "--mount-proc"])
        .options(options)
        .app(app)
        .start()
}

/// The host pid of the namespace's PID 1: unshare does not forward signals, so tests signal it.
fn namespace_init(unshare: &Drainit) -> Pid {
    Pid::from_raw(first_child(unshare.pid().as_raw()).expect("unshare has no child"))
}

#[test]
fn as_pid1_it_reaps_every_orphan() {
    let script = r#"for i in 1 2 3 4 5 6 7 8 9 10; do (sleep 0.1 &); done
sleep 1
echo "parent=$PPID zombies=$(cat /proc/[0-9]*/stat 2>/dev/null | awk '$3 == "Z"' | wc -l)"
exit 3"#;
    let mut drainit = as_pid1(&[], command(&["sh", "-c", script]));
    let report = drainit.app_line("parent=");
    assert_eq!(
        report.text, "parent=1 zombies=0",
        "drainit must be PID 1 and leave no zombie"
    );
    assert_eq!(drainit.exit_code(SECS(5)), 3);
    let exited = drainit.event("app_exited");
    assert!(exited["orphans_reaped"].as_u64().unwrap() >= 10, "{exited}");
}

#[test]
fn as_pid1_sigterm_drains_and_the_exit_code_comes_out() {
    let mut drainit = as_pid1(&["--drain-delay", "500ms"], demo(&["--exit-code", "5"]));
    drainit.app_line("demo-app: listening on");
    drainit.wait_ready();
    assert_eq!(drainit.get("/ready").0, 200);
    kill(namespace_init(&drainit), Signal::SIGTERM).unwrap();
    drainit.event("drain_started");
    assert_eq!(drainit.get("/ready").0, 503);
    drainit.app_line("demo-app: signal TERM");
    assert_eq!(drainit.exit_code(SECS(5)), 5);
}

#[test]
fn as_pid1_the_budget_kill_takes_the_whole_group() {
    let mut drainit = as_pid1(
        &["--drain-delay", "200ms", "--grace-period", "2200ms"],
        demo(&["--ignore-term", "--spawn-grandchild"]),
    );
    drainit.app_line("demo-app: grandchild pid");
    kill(namespace_init(&drainit), Signal::SIGTERM).unwrap();
    assert_eq!(drainit.exit_code(SECS(10)), 137);
}

#[test]
fn not_pid1_it_adopts_and_reaps_orphans_as_a_subreaper() {
    let script = r#"sh -c 'sleep 1 & echo "orphan=$!"'
sleep 30"#;
    let mut drainit = Drainit::start(&["--drain-delay", "0"], &["sh", "-c", script]);
    let orphan: i32 = drainit.app_line("orphan=").text["orphan=".len()..]
        .parse()
        .unwrap();
    assert!(
        time_until(SECS(5), || parent_of(orphan)
            == Some(drainit.pid().as_raw()))
        .is_some(),
        "the orphan was not reparented to drainit (parent {:?})",
        parent_of(orphan)
    );
    // It exits after 1 s; drainit must collect it (no zombie left) while the app runs on.
    assert!(
        time_until(SECS(3), || parent_of(orphan).is_none()).is_some(),
        "orphan {orphan} left as a zombie (running: {})",
        is_running(orphan)
    );
    drainit.signal(Signal::SIGTERM);
    assert_eq!(
        drainit.exit_code(SECS(5)),
        143,
        "sh dies of the stop signal: 128 + 15"
    );
}

#[test]
fn a_blocked_signal_mask_does_not_stop_drainit_and_its_descriptors_stay_its_own() {
    use nix::sys::signal::SigSet;
    use std::os::unix::process::CommandExt;

    let app = "echo fds: $(ls -l /proc/self/fd | grep -c -e socket: -e anon_inode:); \
               exec sleep 30";
    let mut drainit = Drainit::builder()
        .drain_delay("0")
        .app(command(&["sh", "-c", app]))
        .spawn_adjusted(|blocked| {
            // SAFETY: runs in the forked child before exec; sigprocmask is async-signal-safe.
            unsafe {
                blocked.pre_exec(|| {
                    let mut set = SigSet::empty();
                    set.add(Signal::SIGTERM);
                    set.add(Signal::SIGCHLD);
                    set.thread_block().map_err(std::io::Error::from)
                });
            }
        });
    // drainit's own descriptors (probe and control sockets, netlink, epoll, the signal pipe) are
    // sockets or anonymous inodes; what the test itself passes down is neither.
    let fds = drainit.app_line("fds:");
    assert_eq!(
        fds.text.trim(),
        "fds: 0",
        "drainit's descriptors leaked into the app"
    );
    // SIGTERM reaches drainit, and the app's exit (SIGCHLD) too.
    drainit.signal(Signal::SIGTERM);
    assert_eq!(drainit.exit_code(SECS(5)), 128 + 15);
}

#[test]
fn not_pid1_a_daemon_that_left_the_apps_group_dies_with_the_app() {
    // A double-forked daemon in its own session: outside the app's process group, adopted by
    // drainit once its parent is gone.
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up");
    let script = format!(
        "setsid sh -c 'echo daemon=$$; touch {up}; exec sleep 300' & \
         while [ ! -e {up} ]; do sleep 0.02; done; exit 3",
        up = up.display()
    );
    let mut drainit = Drainit::start(&[], &["sh", "-c", &script]);
    let daemon: i32 = drainit.app_line("daemon=").text["daemon=".len()..]
        .parse()
        .unwrap();
    assert_eq!(drainit.exit_code(SECS(5)), 3);
    assert!(
        time_until(SECS(2), || !is_running(daemon)).is_some(),
        "daemon {daemon} outlived drainit"
    );
    drainit.event("leftovers_killed");
}

/// Signals that the app below ignores, so a storm of them changes nothing but drainit's load.
const STORM: [Signal; 5] = [
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGURG,
];

#[test]
fn as_pid1_a_stuck_stderr_and_a_signal_storm_stall_nothing() {
    // The app ignores its stop signal and leaves an orphan every 10 ms for PID 1 to reap.
    let app = "trap '' TERM HUP USR1 USR2; echo trapped; \
               while :; do (sleep 0.02 &); sleep 0.01; done";
    let mut drainit = as_pid1(
        &["--drain-delay", "0", "--grace-period", "3s"],
        command(&["sh", "-c", app]),
    );
    // A signal before the traps are set would end the app, and the test.
    drainit.app_line("trapped");
    let init = namespace_init(&drainit);
    let app_pid = namespace_init_child(init);
    // A log collector that stopped reading: the pipe fills, and every write to it would block.
    drainit.logs.stop_reading();
    // Spaced a little, or the kernel merges them: each is forwarded, with a log line.
    for signal in STORM.iter().cycle().take(1500) {
        kill(init, *signal).unwrap();
        std::thread::sleep(Duration::from_micros(100));
    }
    assert!(
        time_until(SECS(5), || drainit
            .metric("drainit_log_lines_dropped_total")
            > 0.0)
        .is_some(),
        "no log line was dropped: stderr was never stuck, the test proves nothing"
    );
    for _ in 0..3 {
        let asked = std::time::Instant::now();
        assert_eq!(drainit.get("/alive").0, 200);
        assert!(
            asked.elapsed() < SECS(1),
            "/alive took {:?}",
            asked.elapsed()
        );
        let zombies = common::procfs::zombie_children(init.as_raw());
        assert!(zombies < 25, "{zombies} zombies: PID 1 stopped reaping");
        // Samples spread over a second of the storm's aftermath.
        std::thread::sleep(Duration::from_millis(300));
    }
    kill(init, Signal::SIGTERM).unwrap();
    // The budget kill comes at grace - 1 s = 2 s; the kubelet's own SIGKILL would come at 3 s.
    let killed = time_until(SECS(4), || !is_running(app_pid)).expect("no budget kill");
    assert!(
        killed > Duration::from_millis(1800) && killed < SECS(3),
        "budget kill {killed:?} after SIGTERM, due at 2s"
    );
    assert_eq!(drainit.exit_code(SECS(5)), 137);
}

/// The host pid of the app that `init` (a namespace's drainit) started.
fn namespace_init_child(init: Pid) -> i32 {
    let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).unwrap();
    children
        .split_whitespace()
        .next()
        .expect("drainit has no child")
        .parse()
        .unwrap()
}

/// Live processes whose environment holds `mark`.
fn marked_processes(mark: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == mark.as_bytes()))
        })
        .filter(|pid| is_running(*pid))
        .collect()
}

#[test]
fn not_pid1_a_daemon_that_keeps_forking_cannot_outrun_the_cleanup() {
    let mark = format!("DRAINIT_TEST_MARK=forker-{}", std::process::id());
    let (name, value) = mark.split_once('=').unwrap();

    // Daemons that leave the app's group and fork without pause; each child leaves an orphan.
    let script = "for i in 1 2 3 4; do setsid sh -c 'while :; do (sleep 10 &); done' & done
                  sleep 0.5; exit 3";
    let mut drainit = Drainit::builder()
        .env(name, value)
        .app(command(&["sh", "-c", script]))
        .start();
    assert_eq!(drainit.exit_code(SECS(10)), 3);
    // SIGKILLed processes take a moment to be gone.
    time_until(SECS(2), || marked_processes(&mark).is_empty());
    let left = marked_processes(&mark);
    for pid in &left {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    assert!(left.is_empty(), "{} processes outlived drainit", left.len());
    drainit.event("leftovers_killed");
}
