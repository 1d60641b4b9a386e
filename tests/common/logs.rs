//! drainit's JSON log lines (`--log-format json`), read by their stable fields: each line's
//! `event` slug (`drain_over`, `stop_signal_sent`, ...), never its sentence.

use serde_json::Value;

/// A JSON log line, parsed; panics on anything else.
pub fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
}

/// The line's `event` slug; None for a line that is not drainit's (the app's own stderr shares
/// the stream).
pub fn event_of(line: &str) -> Option<String> {
    let log: Value = serde_json::from_str(line).ok()?;
    log["event"].as_str().map(str::to_owned)
}

/// Whether `line` is drainit's log line with this `event` slug.
pub fn is_event(line: &str, slug: &str) -> bool {
    event_of(line).as_deref() == Some(slug)
}

/// Whether `line` is drainit's move of its lifecycle to phase `to` (`ready`, `draining`, ...).
pub fn is_phase(line: &str, to: &str) -> bool {
    serde_json::from_str::<Value>(line)
        .is_ok_and(|log| log["event"] == "phase_changed" && log["to"] == to)
}

/// A log's `evidence`, parsed when it was logged as a JSON string.
pub fn evidence(log: &Value) -> Value {
    match &log["evidence"] {
        Value::String(text) => serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("evidence is not JSON ({e}): {log}")),
        other => other.clone(),
    }
}
