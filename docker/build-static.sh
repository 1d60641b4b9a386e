#!/bin/sh
# Builds the static drainit users ship, for one musl target:
#   docker/build-static.sh x86_64-unknown-linux-musl              # target/<target>/release/drainit
#   docker/build-static.sh aarch64-unknown-linux-musl
#   docker/build-static.sh x86_64-unknown-linux-musl --example demo_app   # other cargo arguments
#
# Same release profile as `cargo build --release --target <target>` (LTO, panic = "unwind"), but
# std is compiled from the toolchain's own sources (`rustup component add rust-src`) with it:
# - without std's backtrace symbolizer (gimli, addr2line, miniz_oxide: 169 KiB of .text). The
#   release binary is stripped, so it has no symbols to resolve a frame to: a panic prints the
#   same message and location, and RUST_BACKTRACE prints no frames instead of "<unknown>" ones;
# - with `optimize_for_size` (smaller sort and formatting code paths, same results).
# build-std is a cargo feature still marked unstable: RUSTC_BOOTSTRAP=1 lets this stable
# toolchain use it, for this build only. x86_64: 1.80 MiB -> 1.55 MiB; arm64: 1.64 -> 1.43 MiB.
# build-std fetches std's own dependencies from crates.io (an offline build needs them vendored),
# and RUSTC_BOOTSTRAP reaches build scripts too: proc-macro2's reruns, so switching between this
# build and a plain `cargo build` rebuilds the proc-macro crates (about a minute).
set -eu
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: docker/build-static.sh <x86_64|aarch64>-unknown-linux-musl [cargo build args]" >&2
    exit 2
fi
target=$1
shift
[ $# -gt 0 ] || set -- --bin drainit
if ! command -v rustc >/dev/null; then
    echo "docker/build-static.sh: no rustc on PATH: install Rust with rustup" >&2
    exit 2
fi
if [ ! -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library/std" ]; then
    echo "docker/build-static.sh: std's sources are missing: run rustup component add rust-src" >&2
    exit 2
fi
RUSTC_BOOTSTRAP=1 exec cargo build --release --locked --target "$target" \
    -Z build-std=std,panic_unwind -Z build-std-features=panic-unwind,optimize_for_size "$@"
