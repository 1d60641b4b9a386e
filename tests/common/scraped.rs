//! A listener in a replica's network namespace that is not the app's: a metrics sidecar (the
//! demo app on another port, outside drainit), scraped from outside on a new connection at a
//! steady cadence, as Prometheus scrapes. Its connections are passive opens of the namespace too:
//! they must not hold a drain.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::binaries::demo_app_bin;
use super::netns::Netns;
use super::process::Proc;

pub struct ScrapedListener {
    pub proc: Proc,
    stop: Arc<AtomicBool>,
    scrapes: Arc<AtomicU64>,
    scraper: Option<JoinHandle<()>>,
}

impl ScrapedListener {
    /// Starts the listener on `port` in `netns` and scrapes it every `every`.
    pub fn start(netns: &Netns, port: u16, every: Duration) -> Self {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &netns.name])
            .arg(demo_app_bin())
            .args(["--listen", &format!("0.0.0.0:{port}"), "--name", "sidecar"]);
        let proc = Proc::spawn("sidecar", &mut command, None);
        proc.wait_line(Duration::from_secs(10), |l| l.contains("listening on"))
            .unwrap_or_else(|| panic!("the sidecar did not listen:\n{}", proc.output()));
        let (stop, scrapes) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let address = SocketAddr::from((netns.ip, port));
        let scraper = {
            let (stop, scrapes) = (stop.clone(), scrapes.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if scrape(address) {
                        scrapes.fetch_add(1, Ordering::Relaxed);
                    }
                    thread::sleep(every);
                }
            })
        };
        ScrapedListener {
            proc,
            stop,
            scrapes,
            scraper: Some(scraper),
        }
    }

    /// Scrapes that got an answer so far.
    pub fn scrapes(&self) -> u64 {
        self.scrapes.load(Ordering::Relaxed)
    }
}

/// One `GET /metrics`-like request on a new connection; whether it was answered.
fn scrape(address: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = Vec::new();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n")
        .and_then(|()| stream.read_to_end(&mut answer))
        .is_ok_and(|_| answer.starts_with(b"HTTP/1.1 200"))
}

impl Drop for ScrapedListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(scraper) = self.scraper.take() {
            let _ = scraper.join();
        }
    }
}
