//! Interactive use: `drainit -- sh` in a terminal. The app gets the terminal's foreground, so it
//! can read from it and Ctrl-C reaches it, as without drainit. `script` provides the terminal.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::{drainit_bin, unique_control, wait_timeout};

/// Runs `drainit -- sh -c <app>` on a fresh pseudo-terminal, typing `keys` after `delay`;
/// returns the exit code and everything the terminal showed.
fn on_a_terminal(app: &str, keys: &[u8]) -> (Option<i32>, String) {
    let drainit = format!(
        "{} --health-listen 127.0.0.1:0 --control {} --log-level warn -- sh -c '{app}'",
        drainit_bin().display(),
        unique_control()
    );
    let mut script = Command::new("script")
        .args(["-qfec", &drainit, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("script(1) from util-linux");
    // Let the app reach its prompt before typing, as a person would.
    thread::sleep(Duration::from_millis(700));
    let mut keyboard = script.stdin.take().unwrap();
    keyboard.write_all(keys).unwrap();
    let status = wait_timeout(&mut script, Duration::from_secs(10));
    if status.is_none() {
        let _ = script.kill();
    }
    drop(keyboard);
    let output = script.wait_with_output().unwrap();
    (
        status.and_then(|s| s.code()),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn the_app_owns_the_terminal_and_can_read_from_it() {
    let (code, screen) = on_a_terminal("read line; echo got:$line; exit 4", b"hello\n");
    assert!(
        screen.contains("got:hello"),
        "the app could not read the terminal:\n{screen}"
    );
    assert_eq!(code, Some(4), "{screen}");
}

#[test]
fn ctrl_c_reaches_the_app() {
    let (code, screen) = on_a_terminal(
        r#"trap "echo interrupted; exit 7" INT; echo waiting; while :; do sleep 0.05; done"#,
        b"\x03",
    );
    assert!(
        screen.contains("interrupted"),
        "Ctrl-C did not reach the app:\n{screen}"
    );
    assert_eq!(code, Some(7), "{screen}");
}
