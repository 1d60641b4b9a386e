//! A load balancer's health checker, played by the test: `/ready` every `every`, with its
//! User-Agent, on a new connection each time.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::drainit::Drainit;
use super::http::{get_request, try_request};

/// Probes `/ready` until dropped (or, with `stop_on_drain`, until its first 503: a load balancer
/// that removed the pod by other means).
pub struct Checker {
    running: Arc<AtomicBool>,
    /// Probes sent so far (counted before each is sent).
    sent: Arc<AtomicUsize>,
    /// When each answered probe was sent, and drainit's answer (0: none).
    probes: Arc<Mutex<Vec<(Instant, u16)>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Checker {
    pub fn start(
        drainit: &Drainit,
        agent: &'static str,
        every: Duration,
        stop_on_drain: bool,
    ) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let probes = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicUsize::new(0));
        let (addr, flag, log, count) = (
            drainit.health,
            running.clone(),
            probes.clone(),
            sent.clone(),
        );
        let thread = thread::spawn(move || {
            let request = get_request("/ready", agent);
            while flag.load(Ordering::Relaxed) {
                count.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                let code = try_request(addr, &request, Duration::from_secs(5)).map_or(0, |a| a.0);
                log.lock().unwrap().push((sent, code));
                if stop_on_drain && code == 503 {
                    return;
                }
                // A checker's pace.
                thread::sleep(every);
            }
        });
        Self {
            running,
            sent,
            probes,
            thread: Some(thread),
        }
    }

    /// Probes sent so far, answered or not.
    pub fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// How many probes got the answer `code`.
    pub fn answered(&self, code: u16) -> usize {
        self.probes
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, c)| *c == code)
            .count()
    }

    /// When the probe was sent that got the `n`th (from 1) answer `code`.
    pub fn nth_answer_sent(&self, code: u16, n: usize) -> Option<Instant> {
        let probes = self.probes.lock().unwrap();
        probes
            .iter()
            .filter(|(_, c)| *c == code)
            .nth(n - 1)
            .map(|(at, _)| *at)
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
