//! Bad input, the one shape: drainit run to its end, one stderr line that names the fix (matched
//! on its documented text: that text is the interface), the documented exit code, and nothing
//! started.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::binaries::drainit_bin;
use super::drainit::unique_control;

/// Runs drainit `args` (with `envs`) to completion, with a free port and control socket unless
/// `args` name their own.
pub fn run_to_end(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let start = Instant::now();
    let output = Command::new(drainit_bin())
        .args([
            "--health-listen",
            "127.0.0.1:0",
            "--control",
            &unique_control(),
        ])
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run drainit");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "drainit took {:?} to fail",
        start.elapsed()
    );
    output
}

/// Asserts that drainit `args` (with `envs`) exit with `code` and a single stderr line
/// containing `says`; returns that line.
pub fn refused_with(args: &[&str], envs: &[(&str, &str)], code: i32, says: &str) -> String {
    let output = run_to_end(args, envs);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(code), "{args:?}: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{args:?}: not one line:\n{stderr}"
    );
    assert!(
        stderr.contains(says),
        "{args:?}: expected '{says}' in: {stderr}"
    );
    stderr
}

/// Asserts that drainit `options` around an app that would leave a marker file exits with `code`
/// and a single stderr line containing `says`, and that the app never ran.
pub fn assert_refused(options: &[&str], code: i32, says: &str) {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("app-ran");
    let touch = format!("touch {}", marker.display());
    let mut args = options.to_vec();
    args.extend(["--", "sh", "-c", &touch]);
    refused_with(&args, &[], code, says);
    assert!(!marker.exists(), "{options:?}: the app was started");
}
