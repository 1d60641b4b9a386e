//! A child's output stream, read line by line on a thread and kept: tests wait for a line (or
//! make sure none comes), count lines and print them all when something fails.

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::clock::Clock;

/// Turns an output line into a timeline entry, or None to leave it out of the timeline.
pub type LineFilter = fn(&str) -> Option<String>;

/// Where the lines a filter keeps go: the test's timeline, under the process's name.
#[derive(Clone)]
pub struct TimelineSink {
    pub clock: Clock,
    pub name: String,
    pub filter: LineFilter,
}

/// One line from a child's stream, with the time the test saw it.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

#[derive(Default)]
struct Seen {
    lines: Vec<Line>,
    /// The stream ended (the writer and every copy of its pipe are gone).
    closed: bool,
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Seen>,
    arrived: Condvar,
    /// Off: the stream is left unread, as by a stuck log collector.
    paused: AtomicBool,
}

/// Every line of one stream so far, plus the ones still to come.
#[derive(Clone)]
pub struct Lines {
    shared: Arc<Shared>,
}

impl Lines {
    /// Starts reading `stream`; with `timeline`, the lines its filter keeps also go there.
    pub fn read(stream: impl Read + Send + 'static, timeline: Option<TimelineSink>) -> Self {
        let shared = Arc::new(Shared::default());
        let reader = shared.clone();
        thread::spawn(move || {
            let mut lines = BufReader::new(stream).lines();
            loop {
                while reader.paused.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(5));
                }
                let Some(Ok(text)) = lines.next() else { break };
                if let Some(sink) = &timeline
                    && let Some(entry) = (sink.filter)(&text)
                {
                    sink.clock.event(format!("{}: {entry}", sink.name));
                }
                let line = Line {
                    at: Instant::now(),
                    text,
                };
                reader.lock().lines.push(line);
                reader.arrived.notify_all();
            }
            reader.lock().closed = true;
            reader.arrived.notify_all();
        });
        Self { shared }
    }

    /// Stops reading the stream (lines already in the test's read buffer still arrive): the
    /// writer blocks once the pipe is full.
    pub fn stop_reading(&self) {
        self.shared.paused.store(true, Ordering::Relaxed);
    }

    pub fn resume_reading(&self) {
        self.shared.paused.store(false, Ordering::Relaxed);
    }

    /// The first line (seen or to come within `timeout`) that matches.
    pub fn wait_for(&self, timeout: Duration, matches: impl Fn(&str) -> bool) -> Option<Line> {
        let deadline = Instant::now() + timeout;
        let mut seen = self.shared.lock();
        loop {
            if let Some(line) = seen.lines.iter().find(|l| matches(&l.text)) {
                return Some(line.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if seen.closed || left.is_zero() {
                return None;
            }
            seen = self.shared.arrived.wait_timeout(seen, left).unwrap().0;
        }
    }

    /// Asserts that no line matches within `window` (nor before): the one way to say "this did
    /// not happen (yet)". A slow machine can only make it pass, never fail.
    pub fn assert_none_within(&self, window: Duration, what: &str, matches: impl Fn(&str) -> bool) {
        if let Some(line) = self.wait_for(window, matches) {
            panic!(
                "{what}, within {window:?}: {}\nall lines:\n{}",
                line.text,
                self.text()
            );
        }
    }

    /// Waits up to `timeout` for the stream to end (the process and its pipe's copies gone).
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut seen = self.shared.lock();
        while !seen.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            seen = self.shared.arrived.wait_timeout(seen, left).unwrap().0;
        }
        true
    }

    pub fn count(&self, matches: impl Fn(&str) -> bool) -> usize {
        self.shared
            .lock()
            .lines
            .iter()
            .filter(|l| matches(&l.text))
            .count()
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<Line> {
        self.shared.lock().lines.clone()
    }

    /// Every line so far, one per line.
    pub fn text(&self) -> String {
        self.all()
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Seen> {
        // A panicking test thread must not hide the lines of the failure.
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}
