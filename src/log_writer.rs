//! The log's way to stderr: a bounded queue emptied by a thread of its own, so that a stderr
//! nobody reads (a stuck log collector, a full pipe) costs log lines, never PID 1's time.
//!
//! Writing a line only appends it to the queue; when the queue is full the line is dropped and
//! counted (`drainit_log_lines_dropped_total`), and once writing works again the log says how many
//! lines it lost. Only the writer thread ever blocks on stderr. It writes to fd 2 directly, not
//! through Rust's `Stderr`, whose lock it would hold while blocked.
//!
//! Not `tracing-appender`: its queue is bounded in lines, not bytes (128,000 lines of any size),
//! it never reports the loss in the log, and its guard waits a fixed 1.1 s at exit and then prints
//! to stdout, which belongs to the app.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::sync::{Condvar, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::fmt::MakeWriter;

/// About 350 log lines (on top of the pipe's own 64 KiB): a burst rides out a slow reader, and a
/// stuck one costs at most this much memory.
const MAX_QUEUED_BYTES: usize = 64 * 1024;
/// What the writer thread needs: it formats nothing, only writes.
const WRITER_STACK: usize = 64 * 1024;

/// The writer for `tracing_subscriber::fmt().with_writer(..)`: every log line goes to the queue.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

/// One log line on its way to the queue.
#[derive(Debug)]
pub struct Line;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line
    }
}

impl Write for Line {
    /// The fmt layer writes each event in one call: one call is one line, kept whole or dropped.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        queue().push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Queues `text` and a newline for stderr, past any log filter: what must be said even with
/// `--log-level off` (why drainit did not start).
pub fn print_line(text: &str) {
    queue().push(format!("{text}\n").as_bytes());
}

/// Waits until every queued line is written, or `limit` has passed (stderr is stuck): drainit
/// calls it once, right before it exits.
pub fn flush(limit: Duration) {
    queue().wait_until_written(Instant::now() + limit);
}

/// Lines dropped because the queue was full or stderr failed; registered in [`crate::metrics`].
pub fn dropped_lines() -> Counter {
    DROPPED.clone()
}

static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);

#[derive(Debug, Default)]
struct Queue {
    state: Mutex<State>,
    /// Lines were queued.
    queued: Condvar,
    /// The writer thread finished a batch.
    written: Condvar,
}

#[derive(Debug, Default)]
struct State {
    lines: VecDeque<Vec<u8>>,
    /// The bytes of queued lines and of the batch being written.
    bytes: usize,
    /// The writer thread is writing a batch.
    writing: bool,
    /// Lines dropped since the log last said so.
    unreported_drops: u64,
}

fn queue() -> &'static Queue {
    static QUEUE: OnceLock<&'static Queue> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let queue: &'static Queue = Box::leak(Box::default());
        let started = std::thread::Builder::new()
            .name("log-writer".into())
            .stack_size(WRITER_STACK)
            .spawn(move || queue.write_forever());
        if started.is_err() {
            // No thread, no log: every line is dropped (and counted), and nothing ever blocks.
            queue.lock().bytes = usize::MAX;
        }
        queue
    })
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    fn push(&self, line: &[u8]) {
        let mut state = self.lock();
        let fits = state
            .bytes
            .checked_add(line.len())
            .is_some_and(|bytes| bytes <= MAX_QUEUED_BYTES);
        if !fits {
            state.unreported_drops += 1;
            drop(state);
            DROPPED.inc();
            return;
        }
        state.bytes += line.len();
        state.lines.push_back(line.to_vec());
        drop(state);
        self.queued.notify_one();
    }

    fn write_forever(&self) {
        // Signals are the supervisor's: none interrupts a write here, and none waits for this
        // thread to be unblocked by a stuck stderr.
        let _ = nix::sys::signal::SigSet::all().thread_block();
        // SAFETY: fd 2 stays open for the life of the process (nothing in drainit closes it);
        // ManuallyDrop keeps this File from closing it.
        let mut stderr = ManuallyDrop::new(unsafe { File::from_raw_fd(2) });
        loop {
            let (batch, drops) = self.next_batch();
            let mut bytes = 0;
            let mut wrote_any = false;
            for line in &batch {
                bytes += line.len();
                match stderr.write_all(line) {
                    Ok(()) => wrote_any = true,
                    // The reader is gone (EPIPE) or stderr is non-blocking and full: the line is
                    // lost. Not reported in the log, which would fail the same way.
                    Err(_) => {
                        DROPPED.inc();
                    }
                }
            }
            self.batch_written(bytes);
            if drops > 0 && wrote_any {
                tracing::warn!(
                    event = "log_lines_dropped",
                    dropped = drops,
                    "{drops} log lines dropped: stderr was not read fast enough"
                );
            } else if drops > 0 {
                self.lock().unreported_drops += drops;
            }
        }
    }

    /// Waits for lines; takes them all, with the drops to report.
    fn next_batch(&self) -> (VecDeque<Vec<u8>>, u64) {
        let mut state = self.lock();
        while state.lines.is_empty() {
            state = self
                .queued
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.writing = true;
        let drops = std::mem::take(&mut state.unreported_drops);
        (std::mem::take(&mut state.lines), drops)
    }

    fn batch_written(&self, bytes: usize) {
        let mut state = self.lock();
        state.writing = false;
        state.bytes -= bytes;
        drop(state);
        self.written.notify_all();
    }

    fn wait_until_written(&self, deadline: Instant) {
        let mut state = self.lock();
        while !state.lines.is_empty() || state.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            state = match self.written.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let queue = Queue::default();
        let line = vec![b'x'; 1000];
        let fit = MAX_QUEUED_BYTES / line.len();
        let started = Instant::now();
        for _ in 0..fit + 10 {
            queue.push(&line);
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        let state = queue.lock();
        assert_eq!(state.lines.len(), fit);
        assert_eq!(state.unreported_drops, 10);
    }

    #[test]
    fn a_line_larger_than_the_queue_is_dropped_whole() {
        let queue = Queue::default();
        queue.push(&vec![b'x'; MAX_QUEUED_BYTES + 1]);
        queue.push(b"small\n");
        let state = queue.lock();
        assert_eq!(state.lines, [b"small\n".to_vec()]);
        assert_eq!(state.unreported_drops, 1);
    }

    #[test]
    fn flushing_a_queue_nobody_writes_gives_up_at_its_deadline() {
        let queue = Queue::default();
        queue.push(b"stuck\n");
        let started = Instant::now();
        queue.wait_until_written(Instant::now() + Duration::from_millis(50));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(50) && waited < Duration::from_secs(2));
    }
}
