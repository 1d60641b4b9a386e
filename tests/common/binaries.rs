//! Which drainit and demo app the tests run. By default cargo's own build of this package; CI
//! sets `DRAINIT_BIN` (and the demo app follows it) to run every test against the static musl
//! binary users ship, and `DEMO_APP_BIN` when the app must come from elsewhere (the arm64 smoke
//! test runs an emulated drainit around a native app).

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn drainit_bin() -> PathBuf {
    std::env::var_os("DRAINIT_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_drainit")),
        PathBuf::from,
    )
}

/// The example app, built by cargo next to drainit (`examples/demo_app`).
pub fn demo_app_bin() -> PathBuf {
    let app = std::env::var_os("DEMO_APP_BIN").map_or_else(
        || drainit_bin().parent().unwrap().join("examples/demo_app"),
        PathBuf::from,
    );
    assert!(
        app.is_file(),
        "demo app not found at {}: a plain `cargo test` builds examples, but `cargo test --test \
         <name>` does not; build it first with `cargo build --release --example demo_app` (or \
         `docker/build-static.sh <triple> --example demo_app` when DRAINIT_BIN points into \
         target/<triple>/)",
        app.display()
    );
    app
}

/// Whether `path` is an ELF executable without a program interpreter (statically linked).
pub fn is_static(path: &Path) -> bool {
    let elf = std::fs::read(path).unwrap();
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (entry_size, entries) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    !(0..entries).any(|i| {
        let at = phoff + i * entry_size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP
    })
}

/// `cargo build --release <args>` with the cargo running the tests (test runs and `cargo bench`
/// do not build everything a test may need).
pub fn cargo_build_release(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["build", "--release"]).args(args);
    build(command);
}

/// The static build users ship, for `target`: `docker/build-static.sh <target> <args>`.
pub fn build_static(target: &str, args: &[&str]) {
    let mut command = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docker/build-static.sh"
    ));
    command.arg(target).args(args);
    build(command);
}

/// Runs a build; panics with its command line if it fails.
fn build(mut command: Command) {
    let built = command.status().expect("run the build");
    assert!(built.success(), "{command:?} failed");
}
