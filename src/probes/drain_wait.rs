//! `GET /drain/wait`: holds a client until the drain is over, then answers 200. It is the app
//! container's preStop hook in sidecar mode (`httpGet: {path: /drain/wait, port: 8099}`): the
//! kubelet sends the app its SIGTERM only once the hook returns, so the app keeps serving while
//! load balancers drain, with nothing added to its image.
//!
//! It only reads the lifecycle: it never starts, ends or changes a drain, so a stranger can make
//! it wait, never make the pod unready. The two preStop hooks (drainit's own `drainit prestop` and
//! the app's) start together and race: with no drain under way, a waiter gives it
//! [`DRAIN_START_WAIT`] to begin, then answers at once and says why.
//!
//! A waiter costs a parked connection, never hyper's buffers: the request is recognised from its
//! first bytes (a hook sends its request in one go), its head consumed, and the answer written by
//! hand. Waiters are bounded ([`MAX_WAITERS`], and [`MAX_WAITERS_PER_ADDRESS`] from one address, so
//! that a crowd needs many addresses to take every place); the rest get 503 at once. Parked
//! connections stay in the connection registry, so a crowd of them is shed like any other crowd.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::lifecycle::State;
use crate::throttle::Throttle;

/// The path of the endpoint.
pub const PATH: &str = "/drain/wait";
/// How long a waiter gives a drain to begin: the kubelet runs both preStop hooks at once, and
/// `drainit prestop` reaches drainit within milliseconds; 5 s covers a loaded node.
pub const DRAIN_START_WAIT: Duration = Duration::from_secs(5);
/// Waiters at once: a pod has one app container hook per container (a handful), so this is room
/// for hooks and operators; anything more is a crowd and gets 503 at once.
pub const MAX_WAITERS: usize = 128;
/// Waiters from one address at once: the kubelet sends one hook per container from the node, so a
/// few are plenty; a client taking every place would make the app's own hook return at once.
pub const MAX_WAITERS_PER_ADDRESS: usize = 4;
/// One log line per this long about refused waiters or waits with no drain.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How a wait ended: the `outcome` label of `drainit_drain_waits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The drain is over: 200.
    Over,
    /// No drain began within [`DRAIN_START_WAIT`]: 409 at once.
    NoDrain,
    /// Too many waiters: 503 at once.
    Refused,
    /// The client left, or its connection was cut to make room, before the end.
    Gone,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Over,
        Outcome::NoDrain,
        Outcome::Refused,
        Outcome::Gone,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Over => "over",
            Outcome::NoDrain => "no_drain",
            Outcome::Refused => "refused",
            Outcome::Gone => "gone",
        }
    }
}

/// The waiters' count and the throttles of their log lines, shared by every connection.
#[derive(Debug)]
pub struct Waiters {
    count: AtomicUsize,
    limit: usize,
    /// Waiters per client address: at most `limit` entries, as each has one waiter or more.
    by_address: Mutex<HashMap<IpAddr, usize>>,
    per_address: usize,
    refused_log: Mutex<Throttle>,
    no_drain_log: Mutex<Throttle>,
}

impl Default for Waiters {
    fn default() -> Self {
        Self::new(MAX_WAITERS, MAX_WAITERS_PER_ADDRESS)
    }
}

impl Waiters {
    pub fn new(limit: usize, per_address: usize) -> Self {
        Self {
            count: AtomicUsize::new(0),
            limit,
            by_address: Mutex::default(),
            per_address,
            refused_log: Mutex::new(Throttle::new(LOG_EVERY)),
            no_drain_log: Mutex::new(Throttle::new(LOG_EVERY)),
        }
    }

    /// A place among the waiters, given back when dropped; `None` when they are all taken, or
    /// `from` holds its share already.
    fn enter(self: &Arc<Self>, from: IpAddr) -> Option<Place> {
        let mut by_address = crate::sync::lock(&self.by_address);
        let held = by_address.get(&from).copied().unwrap_or(0);
        if held >= self.per_address || self.count.load(Ordering::Acquire) >= self.limit {
            return None;
        }
        by_address.insert(from, held + 1);
        self.count.fetch_add(1, Ordering::AcqRel);
        Some(Place(self.clone(), from))
    }

    fn leave(&self, from: IpAddr) {
        let mut by_address = crate::sync::lock(&self.by_address);
        if let Some(held) = by_address.get_mut(&from) {
            *held -= 1;
            if *held == 0 {
                by_address.remove(&from);
            }
        }
        self.count.fetch_sub(1, Ordering::AcqRel);
    }

    /// At exit: gives the waiters woken by the drain's end `limit` to write their answers (the
    /// runtime stops polling tasks once drainit returns).
    pub async fn answered(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.count.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn refused(&self) {
        if let Some(held_back) = crate::sync::lock(&self.refused_log).occurred(Instant::now()) {
            warn!(
                event = "drain_wait_refused",
                limit = self.limit,
                held_back,
                "GET /drain/wait refused with 503: too many waiting already"
            );
        }
    }

    fn no_drain(&self) {
        if let Some(held_back) = crate::sync::lock(&self.no_drain_log).occurred(Instant::now()) {
            warn!(
                event = "drain_wait_no_drain",
                waited_ms = DRAIN_START_WAIT.as_millis() as u64,
                held_back,
                "GET /drain/wait: no drain began, answering at once (is drainit's own preStop hook, drainit prestop, missing?)"
            );
        }
    }
}

struct Place(Arc<Waiters>, IpAddr);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.leave(self.1);
    }
}

/// The length of the request head in `peeked` if it is a whole `GET /drain/wait` request (with
/// or without a query), the only shape a waiter is served in.
pub fn request_head(peeked: &[u8]) -> Option<usize> {
    let rest = peeked
        .strip_prefix(b"GET ")?
        .strip_prefix(PATH.as_bytes())?;
    if !matches!(rest.first(), Some(b' ' | b'?')) {
        return None;
    }
    peeked
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// Serves one waiter on `stream`, whose first `head` bytes are its request: consumes them, waits
/// (or not) and answers. (A connection cut to make room drops this future, and its place.)
pub async fn serve(
    mut stream: TcpStream,
    peer: IpAddr,
    head: usize,
    state: watch::Receiver<State>,
    waiters: Arc<Waiters>,
) -> Outcome {
    if consume(&mut stream, head).await.is_err() {
        return Outcome::Gone;
    }
    let Some(place) = waiters.enter(peer) else {
        waiters.refused();
        answer(&mut stream, Outcome::Refused).await;
        return Outcome::Refused;
    };
    let outcome = tokio::select! {
        outcome = drain_end(state) => outcome,
        () = closed(&mut stream) => Outcome::Gone,
    };
    drop(place);
    match outcome {
        Outcome::NoDrain => waiters.no_drain(),
        Outcome::Gone => debug!(event = "drain_wait_gone", "a /drain/wait client left"),
        _ => {}
    }
    answer(&mut stream, outcome).await;
    outcome
}

/// Waits for the drain to begin (for at most [`DRAIN_START_WAIT`]), then to be over.
pub async fn drain_end(mut state: watch::Receiver<State>) -> Outcome {
    let begun = tokio::time::timeout(DRAIN_START_WAIT, async {
        let _ = state
            .wait_for(|state| state.drain_has_started() || !state.is_alive())
            .await;
    })
    .await;
    if begun.is_err() {
        return Outcome::NoDrain;
    }
    // The channel closes when drainit exits: nothing is left to wait for.
    let _ = state.wait_for(|state| state.drain_is_over()).await;
    info!(
        event = "drain_wait_over",
        "GET /drain/wait answered: the drain is over"
    );
    Outcome::Over
}

/// Reads the request head that was only peeked at.
async fn consume(stream: &mut TcpStream, mut head: usize) -> std::io::Result<()> {
    let mut buffer = [0u8; 512];
    while head > 0 {
        let read = stream.read(&mut buffer[..head.min(512)]).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head -= read;
    }
    Ok(())
}

/// Resolves when the client closes its side (or its connection fails); whatever else it sends
/// is read and dropped.
async fn closed(stream: &mut TcpStream) {
    let mut sink = [0u8; 64];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}

async fn answer(stream: &mut TcpStream, outcome: Outcome) {
    let (status, body) = match outcome {
        Outcome::Over => ("200 OK", "drain over\n"),
        Outcome::NoDrain => ("409 Conflict", "no drain under way\n"),
        Outcome::Refused => ("503 Service Unavailable", "too many waiting\n"),
        Outcome::Gone => return,
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // Bounded: a client that does not read its answer must not hold the task for good.
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{DrainFacts, Event, Gate, Mode, step};

    #[test]
    fn recognises_only_a_whole_get_of_the_path() {
        let request = b"GET /drain/wait HTTP/1.1\r\nHost: 10.0.0.1:8099\r\n\r\n";
        assert_eq!(request_head(request), Some(request.len()));
        assert_eq!(
            request_head(b"GET /drain/wait?x=1 HTTP/1.1\r\n\r\nrest"),
            Some(32)
        );
        for other in [
            &b"GET /drain/wait HTTP/1.1\r\nHost: x\r\n"[..],
            b"GET /drain/waiting HTTP/1.1\r\n\r\n",
            b"POST /drain/wait HTTP/1.1\r\n\r\n",
            b"GET /ready HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(request_head(other), None, "{other:?}");
        }
    }

    #[test]
    fn waiters_are_bounded_and_give_their_place_back() {
        let (a, b, c) = (
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            IpAddr::from([10, 0, 0, 3]),
        );
        let waiters = Arc::new(Waiters::new(3, 2));
        let first = waiters.enter(a).unwrap();
        let _second = waiters.enter(a).unwrap();
        assert!(waiters.enter(a).is_none(), "one address holds its share");
        let _third = waiters.enter(b).unwrap();
        assert!(waiters.enter(c).is_none(), "every place taken");
        drop(first);
        assert!(waiters.enter(c).is_some());
        assert!(crate::sync::lock(&waiters.by_address).len() <= 3);
    }

    fn draining(ready: State) -> State {
        let facts = DrainFacts {
            had_traffic: true,
            kill_after: Duration::from_secs(29),
            mode: Mode::Sidecar,
        };
        step(ready, Event::DrainRequest(facts), Instant::now()).0
    }

    /// With no drain, the wait gives one [`DRAIN_START_WAIT`] to begin; then until it is over.
    #[tokio::test(start_paused = true)]
    async fn waits_for_a_drain_to_begin_then_to_end() {
        let ready = step(State::new(Gate::Open), Event::AppReady, Instant::now()).0;
        let (tx, rx) = watch::channel(ready);
        let started = Instant::now();
        assert_eq!(drain_end(rx.clone()).await, Outcome::NoDrain);
        assert_eq!(started.elapsed(), DRAIN_START_WAIT);

        let waiter = tokio::spawn(drain_end(rx));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let draining = draining(ready);
        tx.send_replace(draining);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!waiter.is_finished(), "a drain under way holds the waiter");
        tx.send_replace(step(draining, Event::DrainOver, Instant::now()).0);
        assert_eq!(waiter.await.unwrap(), Outcome::Over);
    }
}
