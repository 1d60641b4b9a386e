//! Logs on stderr (the app owns stdout), as text or one JSON object per line.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::{LogFormat, SharedArgs};
use crate::exit::StartupError;

pub fn init(args: &SharedArgs) -> Result<(), StartupError> {
    let filter = EnvFilter::try_new(&args.log_level).map_err(|e| {
        StartupError::usage(format!(
            "invalid --log-level '{}': {e} (use e.g. info, debug or drainit=debug)",
            args.log_level
        ))
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match args.log_format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    log_panics();
    Ok(())
}

/// A panic in one task (the probe server, a watcher) unwinds that task only: drainit and the
/// app carry on. Say so in the log, in its format, rather than as raw text on stderr.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "a drainit task panicked; drainit and the app carry on without it");
    }));
}
