//! Logs on stderr (the app owns stdout), as text or one JSON object per line.

use std::io::IsTerminal;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::{LogFormat, SharedArgs};
use crate::exit::StartupError;
use crate::log_writer;

pub fn init(args: &SharedArgs) -> Result<(), StartupError> {
    // `Targets` reads the same `drainit=debug,info` directives as EnvFilter without its regex
    // engine (a quarter of the binary).
    let filter: Targets = args.log_level.parse().map_err(|e| {
        StartupError::usage(format!(
            "invalid --log-level '{}': {e} (use e.g. info, debug or drainit=debug)",
            args.log_level
        ))
    })?;
    let builder = tracing_subscriber::fmt()
        // Everything reaches the `Targets` layer, which decides.
        .with_max_level(LevelFilter::TRACE)
        // Never blocks: a stderr nobody reads costs log lines, not PID 1's time.
        .with_writer(log_writer::Stderr)
        // A write that fails is otherwise reported with eprintln!, which blocks on a stuck
        // stderr and panics on a closed one, and again from the panic hook.
        .log_internal_errors(false)
        .with_target(false);
    match args.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .with(filter)
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .finish()
            .with(filter)
            .init(),
    }
    log_panics();
    Ok(())
}

/// A panic unwinds its own task only (panic = "unwind"). Log it in the log's format rather than
/// as raw text on stderr.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(event = "task_panicked", panic = %info, "drainit bug: a task panicked");
    }));
}
