//! Interactive use: `drainit -- sh` in a terminal. The app gets the terminal's foreground, so it
//! can read from it and Ctrl-C reaches it, as without drainit. `script` provides the terminal.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{drainit_bin, time_until, unique_control, wait_timeout};

/// The app's cue that it is ready for keys: typed earlier, Ctrl-C could beat its trap.
const PROMPT: &str = "waiting";

/// Runs `drainit -- sh -c <app>` on a fresh pseudo-terminal, typing `keys` once the app has
/// printed [`PROMPT`]; returns the exit code and everything the terminal showed.
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
    let screen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let (mut stdout, screen) = (script.stdout.take().unwrap(), screen.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                screen
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let prompted = time_until(Duration::from_secs(10), || {
        screen.lock().unwrap().contains(PROMPT)
    });
    let mut keyboard = script.stdin.take().unwrap();
    if prompted.is_some() {
        keyboard.write_all(keys).unwrap();
    }
    let status = wait_timeout(&mut script, Duration::from_secs(10));
    if status.is_none() {
        let _ = script.kill();
        let _ = script.wait();
    }
    drop(keyboard);
    reader.join().unwrap();
    let screen = screen.lock().unwrap().clone();
    assert!(prompted.is_some(), "the app never prompted:\n{screen}");
    (status.and_then(|s| s.code()), screen)
}

#[test]
fn the_app_owns_the_terminal_and_can_read_from_it() {
    let (code, screen) = on_a_terminal(
        "echo waiting; read line; echo got:$line; exit 4",
        b"hello\n",
    );
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
