//! drainit as PID 1 of a real container, as users ship it: the final stage of docker/Dockerfile
//! fed the static binary, on a `FROM scratch` app image holding only the static demo app, run by
//! podman. Checks what a kubelet relies on: PID 1, /ready from outside, `podman stop` drains and
//! the container exits with the app's code, the budget kill lands before the runtime's own kill,
//! and `drainit prestop` runs with no shell in the image.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::binaries::{build_static, is_static};
use common::{demo_app_bin, drainit_bin, http_get, time_until};

const SECS: fn(u64) -> Duration = Duration::from_secs;
const IMAGE: &str = "localhost/drainit-container-test:latest";
const APP_IMAGE: &str = "localhost/drainit-container-test-app:latest";

/// podman with the flags these machines need: runc (crun fails on hybrid cgroups), cgroupfs, and
/// rlimits within the hard limits.
fn podman(args: &[&str]) -> Command {
    let mut command = Command::new("podman");
    command
        .args([
            "--runtime",
            "/usr/sbin/runc",
            "--cgroup-manager",
            "cgroupfs",
        ])
        .args(args);
    command
}

fn run_ok(mut command: Command) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("run podman");
    assert!(
        status.success(),
        "{command:?} failed ({status}):\n{}",
        String::from_utf8_lossy(&stderr)
    );
    String::from_utf8(stdout).unwrap().trim().to_owned()
}

/// Whether podman is installed. CI installs it, so there a missing podman fails the test
/// instead of skipping it.
fn podman_available() -> bool {
    let found = Command::new("podman")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found || std::env::var_os("CI").is_none(),
        "podman is missing in CI: .ci/run installs podman and runc"
    );
    if !found {
        eprintln!(
            "SKIPPED: podman is not installed (apt-get install podman runc to run this test)"
        );
    }
    found
}

/// The static drainit and demo app: the ones under test when drainit is static (CI points
/// DRAINIT_BIN at the musl build; the demo app is built next to it), else built here for this
/// machine's musl target.
fn static_binaries() -> (PathBuf, PathBuf) {
    let drainit = drainit_bin();
    if is_static(&drainit) {
        return (drainit, demo_app_bin());
    }
    let target = format!("{}-unknown-linux-musl", std::env::consts::ARCH);
    // As the Dockerfile builds them; apart: built together, the example's dev-dependency
    // features would end up in drainit.
    build_static(&target, &["--bin", "drainit"]);
    build_static(&target, &["--example", "demo_app"]);
    let dir = drainit.parent().unwrap().parent().unwrap().join(&target);
    let dir = dir.join("release");
    (dir.join("drainit"), dir.join("examples/demo_app"))
}

/// Builds the app image (scratch + the demo app as /app/server), then docker/Dockerfile's final
/// stage on top of it with the prebuilt drainit: the image users get. Once per test run.
fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let (drainit, app) = static_binaries();
        let context = tempfile::tempdir().unwrap();
        std::fs::copy(drainit, context.path().join("drainit")).unwrap();
        std::fs::copy(app, context.path().join("server")).unwrap();
        let app_file = context.path().join("App.Containerfile");
        std::fs::write(&app_file, "FROM scratch\nCOPY server /app/server\n").unwrap();
        let context = context.path().to_str().unwrap();
        run_ok(podman(&[
            "build",
            "--quiet",
            "--pull=never",
            "-f",
            app_file.to_str().unwrap(),
            "-t",
            APP_IMAGE,
            context,
        ]));
        let dockerfile = concat!(env!("CARGO_MANIFEST_DIR"), "/docker/Dockerfile");
        let app_arg = format!("APP_IMAGE={APP_IMAGE}");
        run_ok(podman(&[
            "build",
            "--quiet",
            "--pull=never",
            "-f",
            dockerfile,
            "--build-arg",
            "DRAINIT_FROM=prebuilt",
            "--build-arg",
            &app_arg,
            "-t",
            IMAGE,
            context,
        ]));
    });
    IMAGE
}

/// A running container, removed when dropped.
struct Container {
    name: String,
    health: SocketAddr,
    app: SocketAddr,
}

impl Container {
    /// The image with drainit settings in `env` (as a Deployment sets them) around the demo app
    /// serving on all interfaces with `app_options`. Waits until /ready answers from outside.
    fn start(env: &[&str], app_options: &[&str]) -> Self {
        let name = format!("drainit-test-{}-{}", std::process::id(), unique());
        let mut args = vec!["run", "-d", "--name", &name];
        args.extend([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
        ]);
        args.extend(["-p", "127.0.0.1::8099", "-p", "127.0.0.1::8080"]);
        for var in env {
            args.extend(["-e", var]);
        }
        args.extend([image(), "/app/server", "--listen", "0.0.0.0:8080"]);
        args.extend(app_options);
        run_ok(podman(&args));
        let published =
            |port: &str| -> SocketAddr { run_ok(podman(&["port", &name, port])).parse().unwrap() };
        let container = Self {
            health: published("8099/tcp"),
            app: published("8080/tcp"),
            name,
        };
        let ready = time_until(SECS(20), || container.ready() == Some(200));
        assert!(
            ready.is_some(),
            "/ready never answered 200 from outside; logs:\n{}",
            container.logs()
        );
        container
    }

    /// /ready's status seen from outside the container, if it answers at all (the published
    /// port accepts connections before drainit listens, and after it exited).
    fn ready(&self) -> Option<u16> {
        let mut stream = TcpStream::connect_timeout(&self.health, SECS(1)).ok()?;
        stream.set_read_timeout(Some(SECS(2))).ok()?;
        stream
            .write_all(b"GET /ready HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    }

    fn inspect(&self, format: &str) -> String {
        run_ok(podman(&["inspect", "--format", format, &self.name]))
    }

    /// `podman stop -t grace`: SIGTERM to PID 1, SIGKILL after `grace` seconds.
    fn stop(&self, grace: u64) -> Child {
        podman(&["stop", "-t", &grace.to_string(), &self.name])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// The container's exit code, once it has exited.
    fn exit_code(&self) -> i32 {
        run_ok(podman(&["wait", &self.name])).parse().unwrap()
    }

    fn logs(&self) -> String {
        let output = podman(&["logs", &self.name]).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn unique() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The pid a process has inside its own PID namespace (the last NSpid field).
fn pid_in_namespace(host_pid: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    nspid.split_whitespace().last().unwrap().to_owned()
}

#[test]
fn podman_stop_drains_and_the_container_exits_with_the_apps_code() {
    if !podman_available() {
        return;
    }
    let container = Container::start(
        &["DRAINIT_DRAIN_DELAY=3s", "DRAINIT_GRACE_PERIOD=20s"],
        &["--exit-code", "3"],
    );
    let host_pid = container.inspect("{{.State.Pid}}");
    assert_eq!(pid_in_namespace(&host_pid), "1", "drainit is not PID 1");
    let exe = std::fs::read_link(format!("/proc/{host_pid}/exe")).unwrap();
    assert!(exe.ends_with("drainit"), "PID 1 is {exe:?}");

    let stopping = Instant::now();
    let mut stop = container.stop(20);
    let flip = time_until(SECS(3), || container.ready() == Some(503));
    assert!(flip.is_some(), "/ready never turned 503 on podman stop");
    // Draining: the app still serves from outside until the drain delay is over.
    let served = time_until(Duration::from_millis(1500), || {
        http_get(container.app, "/").0 == 200
    });
    assert!(served.is_some(), "the app stopped serving during the drain");
    assert!(
        stopping.elapsed() < SECS(3),
        "the app was checked too late to be within the drain"
    );

    assert!(stop.wait().unwrap().success(), "podman stop failed");
    let took = stopping.elapsed();
    assert!(
        took >= SECS(3) && took < SECS(15),
        "podman stop took {took:?}: the drain lasts 3 s and the app exits on its stop signal"
    );
    assert_eq!(container.exit_code(), 3, "logs:\n{}", container.logs());
    let logs = container.logs();
    assert!(logs.contains("demo-app: signal TERM"), "logs:\n{logs}");
    assert!(logs.contains(r#"event="drain_over""#), "logs:\n{logs}");
}

#[test]
fn an_app_ignoring_sigterm_is_killed_at_grace_minus_one_second_before_podmans_kill() {
    if !podman_available() {
        return;
    }
    let container = Container::start(
        &["DRAINIT_DRAIN_DELAY=1s", "DRAINIT_GRACE_PERIOD=4s"],
        &["--ignore-term"],
    );
    let stopping = Instant::now();
    // podman's own SIGKILL would come 12 s after its SIGTERM.
    let mut stop = container.stop(12);
    assert!(stop.wait().unwrap().success(), "podman stop failed");
    let took = stopping.elapsed();
    assert_eq!(container.exit_code(), 137, "logs:\n{}", container.logs());
    assert!(
        took >= Duration::from_millis(2500) && took < SECS(9),
        "the container stopped {took:?} after podman stop: drainit's budget kill is due at 3 s"
    );
    assert!(container.logs().contains("demo-app: signal TERM"));
}

#[test]
fn drainit_prestop_runs_by_podman_exec_with_no_shell_in_the_image() {
    if !podman_available() {
        return;
    }
    let container = Container::start(&["DRAINIT_DRAIN_DELAY=2s"], &[]);
    let started = Instant::now();
    let prestop = podman(&["exec", &container.name, "/usr/local/bin/drainit", "prestop"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let flip = time_until(SECS(3), || container.ready() == Some(503));
    assert!(flip.is_some(), "/ready never turned 503 on drainit prestop");
    let output = prestop.wait_with_output().unwrap();
    let took = started.elapsed();
    assert!(
        output.status.success(),
        "drainit prestop failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        took >= SECS(2),
        "drainit prestop returned after {took:?}, before the 2 s drain was over"
    );
    // Still serving until the kubelet's SIGTERM, which then stops the app at once.
    assert_eq!(http_get(container.app, "/").0, 200);
    let mut stop = container.stop(20);
    assert!(stop.wait().unwrap().success());
    assert_eq!(container.exit_code(), 0, "logs:\n{}", container.logs());
}
