//! The `traffic` watcher: has the app stopped receiving requests? Observed from the kernel's TCP
//! counters (never in the data path): new connections accepted in the pod's network namespace
//! (less drainit's own probe connections), and inbound bytes on every connection to the app's
//! ports. Arrivals are what count, not open connections: keep-alive pools hold connections open
//! long after a load balancer stopped using them.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use super::evidence::Quiet;
use crate::lifecycle::{Phase, State};
use crate::metrics::Metrics;
use crate::tcp::{self, Connection, TcpSampler};

/// How far back the arrival rate before the drain is measured.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Fewer events than this in the window say nothing reliable about the rate.
const MIN_EVENTS_FOR_RATE: u64 = 5;
/// The auto quiet period leaves this chance that a replica still in rotation saw no request.
const MISS_PROBABILITY: f64 = 0.001;
/// Never call traffic quiet sooner than this.
const MIN_QUIET: Duration = Duration::from_secs(1);

/// One look at the kernel's counters.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Connections accepted by any listener of the network namespace, cumulative.
    pub passive_opens: Option<u64>,
    /// Connections to drainit's own probe port among `passive_opens` (accepted or waiting to
    /// be): not the app's traffic.
    pub own_accepts: u64,
    /// Connections to the app's ports; `None` when sock_diag is unavailable.
    pub connections: Option<Vec<Connection>>,
}

/// What the watcher has seen so far.
#[derive(Debug)]
pub struct Traffic {
    /// The app's serving ports, given or discovered.
    pub ports: Vec<u16>,
    /// Bytes received so far by each connection, by socket cookie.
    bytes_by_socket: HashMap<u64, Option<u64>>,
    /// (passive opens - connections to the probe port) at the last look; see
    /// [`OwnPort::passive_opens`] for how a flood of probe connections is kept out of it.
    app_accepts_before: Option<u64>,
    /// Times of observed activity (a sample's event count), for the rate before the drain.
    events: VecDeque<(Instant, u32)>,
    pub last_activity: Option<Instant>,
    /// When a kernel counter was last read: quiet is only vouched for up to then.
    last_observed: Option<Instant>,
    /// When the connection counter and the app's sockets were last read.
    counter_read: Option<Instant>,
    sockets_read: Option<Instant>,
    /// `app_accepts_before` as of the last socket dump.
    accepts_at_last_dump: Option<u64>,
    /// When the watcher learned the app got its stop signal.
    stopped_at: Option<Instant>,
    pub last_new_connection: Option<Instant>,
    pub open_connections: usize,
    /// Events that surely came after the stop signal: requests that arrived after the drain
    /// ended. Only readings whose previous reading was already after the stop count: the first
    /// one after it also holds what arrived just before.
    pub late_events: u64,
    pub started: Instant,
    /// Why the watcher cannot see everything, if so.
    pub blind_spot: Option<String>,
}

impl Traffic {
    pub fn new(ports: Vec<u16>, started: Instant) -> Self {
        Self {
            ports,
            bytes_by_socket: HashMap::new(),
            app_accepts_before: None,
            events: VecDeque::new(),
            last_activity: None,
            last_observed: None,
            counter_read: None,
            sockets_read: None,
            accepts_at_last_dump: None,
            stopped_at: None,
            last_new_connection: None,
            open_connections: 0,
            late_events: 0,
            started,
            blind_spot: None,
        }
    }

    /// Takes in one observation made at `at`; returns how many events (new connections, and
    /// connections that received bytes) it shows.
    pub fn observe(&mut self, observation: Observation, at: Instant) -> u32 {
        let read_counter = observation.passive_opens.is_some();
        let read_sockets = observation.connections.is_some();
        if read_counter || read_sockets {
            self.last_observed = Some(at);
        }
        let counter_window_after_stop = self.after_stop(self.counter_read);
        let sockets_window_after_stop = self.after_stop(self.sockets_read);
        let counted_by = |window_after_stop: bool, events: u64| {
            if window_after_stop { events } else { 0 }
        };
        let mut new_connections = 0u64;
        if let Some(opens) = observation.passive_opens {
            let app_accepts = opens.saturating_sub(observation.own_accepts);
            if let Some(before) = self.app_accepts_before {
                new_connections = app_accepts.saturating_sub(before);
            }
            self.app_accepts_before = Some(app_accepts);
        }
        let mut receiving = 0u64;
        if let Some(connections) = observation.connections {
            let mut unseen = 0u64;
            let mut current = HashMap::with_capacity(connections.len());
            for conn in &connections {
                match self.bytes_by_socket.get(&conn.cookie) {
                    Some(before) if conn.bytes_received > *before => receiving += 1,
                    Some(_) => {}
                    None => unseen += 1,
                }
                current.insert(conn.cookie, conn.bytes_received);
            }
            // Without the kernel's passive-open counter, connections never seen before stand in.
            if observation.passive_opens.is_none() && !self.bytes_by_socket.is_empty() {
                new_connections = unseen;
            }
            self.open_connections = connections.len();
            self.bytes_by_socket = current;
        }
        let new_connections_window = if read_counter {
            counter_window_after_stop
        } else {
            sockets_window_after_stop
        };
        self.late_events += counted_by(new_connections_window, new_connections)
            + counted_by(sockets_window_after_stop, receiving);
        if read_counter {
            self.counter_read = Some(at);
        }
        if read_sockets {
            self.sockets_read = Some(at);
            self.accepts_at_last_dump = self.app_accepts_before;
        }
        let events = u32::try_from(new_connections + receiving).unwrap_or(u32::MAX);
        if new_connections > 0 {
            self.last_new_connection = Some(at);
        }
        if events > 0 {
            self.last_activity = Some(at);
            self.events.push_back((at, events));
        }
        while self
            .events
            .front()
            .is_some_and(|(t, _)| *t + RATE_WINDOW < at)
        {
            self.events.pop_front();
        }
        events
    }

    /// Whether a socket dump could show anything new: connections to the app were open at the
    /// last one, or the app has accepted connections since (every new one is an accept).
    pub fn sockets_may_have_changed(&self) -> bool {
        self.open_connections > 0
            || self.accepts_at_last_dump.is_none()
            || self.accepts_at_last_dump != self.app_accepts_before
    }

    /// The app got its stop signal (first call wins): arrivals from now on are late.
    pub fn mark_stopped(&mut self, at: Instant) {
        self.stopped_at.get_or_insert(at);
    }

    fn after_stop(&self, reading: Option<Instant>) -> bool {
        matches!((self.stopped_at, reading), (Some(stop), Some(read)) if read >= stop)
    }

    /// Events per second over the window before `until`, if enough were seen to say.
    pub fn rate(&self, until: Instant) -> Option<f64> {
        let from = until
            .checked_sub(RATE_WINDOW)
            .unwrap_or(self.started)
            .max(self.started);
        let events: u64 = self
            .events
            .iter()
            .filter(|(t, _)| *t >= from && *t <= until)
            .map(|(_, n)| u64::from(*n))
            .sum();
        let span = until.saturating_duration_since(from).as_secs_f64();
        (events >= MIN_EVENTS_FOR_RATE && span > 0.0).then(|| events as f64 / span)
    }

    /// How long nothing has arrived, counting from `since` if nothing did after it, up to the
    /// last look at the kernel (not up to now: a sampler that stalled must never make traffic
    /// look quiet).
    pub fn quiet_for(&self, since: Instant) -> Duration {
        let quiet_from = self.last_activity.map_or(since, |t| t.max(since));
        self.last_observed.map_or(Duration::ZERO, |seen| {
            seen.saturating_duration_since(quiet_from)
        })
    }

    /// What the watcher sees, for `/status` (what the drain decided is published apart).
    pub fn status(&self, now: Instant) -> Value {
        let ago =
            |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t).as_millis() as u64);
        json!({
            "ports": self.ports,
            "open_connections": self.open_connections,
            "rate_per_s": self.rate(now),
            "last_activity_ms_ago": ago(self.last_activity),
            "last_new_connection_ms_ago": ago(self.last_new_connection),
            "late_events": self.late_events,
            "blind_spot": self.blind_spot,
        })
    }
}

/// How long traffic must stay away before the replica is taken as out of rotation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QuietPeriod {
    /// Derived from the arrival rate before the drain.
    Auto,
    Fixed(Duration),
}

impl QuietPeriod {
    /// The period to use and why. Auto: a replica still in rotation gets requests at rate r, so
    /// a gap of T or more starts about r * e^(-rT) times a second; over a drain of up to `max` (W)
    /// that happens with probability about r * W * e^(-rT). T = ln(1000 * max(1, rW)) / r makes
    /// it 0.1 % for the whole drain, not just for one gap. Never under 1 s, never past `max`;
    /// with no measurable rate, `max`.
    pub fn resolve(self, rate: Option<f64>, max: Duration) -> Quiet {
        let (period, reason) = match (self, rate) {
            (QuietPeriod::Fixed(period), _) => (period, "fixed by --quiet-period".into()),
            (QuietPeriod::Auto, Some(rate)) if rate > 0.0 => {
                let chances = (rate * max.as_secs_f64()).max(1.0);
                let seconds = (chances / MISS_PROBABILITY).ln() / rate;
                let period = Duration::try_from_secs_f64(seconds).unwrap_or(max);
                let clamped = period.clamp(MIN_QUIET, max.max(MIN_QUIET));
                let why = format!(
                    "auto: {rate:.2} arrivals/s before the drain; a {period:.1?} gap has a 0.1% chance within --drain-max"
                );
                (clamped, why)
            }
            (QuietPeriod::Auto, _) => (
                max,
                "auto: too little traffic before the drain to measure, using --drain-max".into(),
            ),
        };
        Quiet { period, reason }
    }
}

/// Shared between the sampling task (writer), the drain and `/status` (readers).
pub type SharedTraffic = Arc<Mutex<Traffic>>;

/// Samples the kernel's counters for the app's ports until the process exits; runs from start-up
/// so the rate before the drain is known when it begins. Also logs requests that arrive after the
/// stop signal: the drain ended too early.
pub async fn monitor(
    traffic: SharedTraffic,
    app: Pid,
    given_ports: Vec<u16>,
    own_port: OwnPort,
    mut state: watch::Receiver<State>,
    metrics: Arc<Metrics>,
) {
    let mut sampler = match TcpSampler::new() {
        Ok(sampler) => Some(sampler),
        Err(e) => {
            let why = format!(
                "sock_diag unavailable ({e}): only new connections are seen, not requests on kept-alive ones"
            );
            warn!(event = "traffic_watcher_degraded", "traffic watcher: {why}");
            lock(&traffic).blind_spot = Some(why);
            None
        }
    };
    let mut ports_looked_up: Option<Instant> = None;
    let mut sockets_read: Option<Instant> = None;
    let mut stop_seen = false;
    // Nothing arrives at an app the moment it is spawned: the first look waits one reading
    // interval, and a command that is gone by then (`drainit -- true`) costs no blocking thread.
    let _ = tokio::time::timeout(BEFORE_DRAIN.counter, state.changed()).await;
    if matches!(state.borrow().phase, Phase::Exited { .. }) {
        return;
    }
    loop {
        let State {
            phase: current,
            drain_started,
            ..
        } = *state.borrow_and_update();
        // The first look after the stop signal closes the window that straddles it, so that
        // later readings count as late (see `Traffic::late_events`).
        let first_look_after_stop = matches!(current, Phase::Stopping) && !stop_seen;
        if first_look_after_stop {
            stop_seen = true;
            lock(&traffic).mark_stopped(Instant::now());
        }
        let cadence = Cadence::of(current);
        let ports_known = !lock(&traffic).ports.is_empty();
        let rediscover = if ports_known {
            REDISCOVER_PORTS
        } else {
            DISCOVER_PORTS
        };
        if given_ports.is_empty()
            && !current.drain_has_started()
            && is_due(ports_looked_up, rediscover)
        {
            let (back, ports) = discover_ports(sampler.take(), app, own_port.port).await;
            sampler = back;
            ports_looked_up = Some(Instant::now());
            let mut traffic = lock(&traffic);
            if traffic.ports != ports {
                info!(event = "app_ports_found", ports = ?ports, "traffic watcher: app ports");
                traffic.ports = ports;
            }
        }
        // A dump walks the node's whole connection table: before the drain, skip it while the
        // app has no connection and has accepted none (a probe racing the counter can hide one
        // briefly, hence the bound). During the drain, always look.
        let dump_every = if current.drain_has_started() {
            cadence.sockets
        } else {
            dump_interval_before_drain(lock(&traffic).open_connections)
        };
        let dump_sockets = first_look_after_stop
            || (is_due(sockets_read, dump_every)
                && (current.drain_has_started()
                    || is_due(sockets_read, SKIPPED_DUMPS_AT_MOST)
                    || lock(&traffic).sockets_may_have_changed()));
        let ports = lock(&traffic).ports.clone();
        let (back, observation) = observe(
            sampler.take(),
            dump_sockets.then_some(ports),
            own_port.clone(),
        )
        .await;
        sampler = back;
        if dump_sockets {
            sockets_read = Some(Instant::now());
        }
        let late = {
            let mut traffic = lock(&traffic);
            let late_before = traffic.late_events;
            traffic.observe(observation, Instant::now());
            traffic.late_events - late_before
        };
        if late > 0 {
            metrics.late_arrivals(late);
            warn!(
                event = "late_arrival",
                events = late,
                elapsed_ms = drain_started.map(|t| t.elapsed().as_millis() as u64),
                "late arrival: requests reached the app after its stop signal (the drain ended too early)"
            );
        }
        if matches!(current, Phase::Exited { .. }) {
            return;
        }
        // Wake early when the phase changes, so sampling speeds up as soon as the drain starts.
        let _ = tokio::time::timeout(cadence.counter, state.changed()).await;
    }
}

/// How often each source is read. The namespace's connection counter is a cheap file read; a
/// socket dump walks the kernel's whole connection table, shared by every namespace of the node
/// (about 2.6 ms on a 24 GiB node, however few sockets the pod has).
struct Cadence {
    counter: Duration,
    sockets: Duration,
}

impl Cadence {
    fn of(phase: Phase) -> Self {
        match phase {
            Phase::Stopping | Phase::Exited { .. } => AFTER_STOP,
            _ if phase.drain_has_started() => DURING_DRAIN,
            _ => BEFORE_DRAIN,
        }
    }
}

/// Before the drain only the arrival rate is needed (kept-alive requests seen less often only
/// make the rate look lower, and the quiet period longer).
const BEFORE_DRAIN: Cadence = Cadence {
    counter: Duration::from_millis(250),
    sockets: Duration::from_secs(2),
};
/// During the drain, new connections are seen within 100 ms and requests on kept-alive
/// connections within 500 ms (a late sighting only makes the drain longer, never shorter).
const DURING_DRAIN: Cadence = Cadence {
    counter: Duration::from_millis(100),
    sockets: Duration::from_millis(500),
};
/// After the stop signal, until the app exits (seconds at most): late arrivals are worth seeing
/// before the app is gone.
const AFTER_STOP: Cadence = Cadence {
    counter: Duration::from_millis(100),
    sockets: Duration::from_millis(200),
};
/// Before the drain, a dump costs more the more connections it returns (each with its tcp_info):
/// keep it near the cost of 1,000 connections every 2 s, so watching stays under 1 % CPU.
fn dump_interval_before_drain(open_connections: usize) -> Duration {
    let thousands = u32::try_from(open_connections.div_ceil(1000))
        .unwrap_or(u32::MAX)
        .max(1);
    BEFORE_DRAIN
        .sockets
        .saturating_mul(thousands)
        .min(SKIPPED_DUMPS_AT_MOST)
}

/// Before the drain, the longest an idle app goes without a socket dump.
const SKIPPED_DUMPS_AT_MOST: Duration = Duration::from_secs(10);
/// Finding the app's ports reads every file descriptor of its processes (about 8 us each).
/// Until the app listens somewhere, look often: it is just starting and has few descriptors.
const DISCOVER_PORTS: Duration = Duration::from_millis(500);
const REDISCOVER_PORTS: Duration = Duration::from_secs(30);

fn is_due(last: Option<Instant>, every: Duration) -> bool {
    last.is_none_or(|t| t.elapsed() >= every)
}

/// Runs a blocking kernel query off the async thread: a slow dump must never hold up signals.
async fn off_thread<T: Default + Send + 'static>(
    sampler: Option<TcpSampler>,
    query: impl FnOnce(&mut Option<TcpSampler>) -> T + Send + 'static,
) -> (Option<TcpSampler>, T) {
    let result = tokio::task::spawn_blocking(move || {
        let mut sampler = sampler;
        let value = query(&mut sampler);
        (sampler, value)
    })
    .await;
    match result {
        Ok(done) => done,
        // A bug in the query: carry on without sock_diag rather than stop watching. An empty
        // observation changes nothing, and a watcher that stops observing never calls traffic
        // quiet (see `Traffic::quiet_for`).
        Err(e) => {
            warn!(event = "sock_diag_failed", error = %e, "traffic sampler failed: going on without sock_diag");
            (None, T::default())
        }
    }
}

/// Reads the connection counter, and the app's sockets when `ports` is given.
async fn observe(
    sampler: Option<TcpSampler>,
    ports: Option<Vec<u16>>,
    own_port: OwnPort,
) -> (Option<TcpSampler>, Observation) {
    off_thread(sampler, move |sampler| {
        let (passive_opens, own_accepts) = own_port.passive_opens();
        Observation {
            passive_opens,
            own_accepts,
            connections: ports.and_then(|ports| sampler.as_mut()?.connections(&ports).ok()),
        }
    })
    .await
}

/// drainit's own probe port: connections to it are never the app's traffic, however many.
#[derive(Debug, Clone)]
pub struct OwnPort {
    pub port: u16,
    /// The probe listener (a duplicate descriptor): its accept queue is read from it.
    pub listener: Option<Arc<OwnedFd>>,
    /// Connections the probe server accepted, cumulative.
    pub accepts: Arc<AtomicU64>,
}

/// The kernel's TCP_LISTEN socket state (include/net/tcp_states.h).
const TCP_LISTEN: u8 = 10;
/// Readings of the counter retried while connections keep arriving between them.
const COUNTER_READS: usize = 4;

impl OwnPort {
    /// The namespace's passive opens and how many of them were to the probe port. The kernel
    /// counts a connection when its handshake completes, before drainit accepts it, so a flood
    /// of probe connections would look like app traffic if the accept queue were left out. The
    /// probe port's share must never be overstated (that would hide an app arrival: a shorter
    /// drain): its accepts are read before its queue (a connection accepted in between is
    /// missed, not counted twice), and both between two readings of the counter that agree (no
    /// connection completed in between). If they never agree, the share is understated: a
    /// longer drain at worst.
    fn passive_opens(&self) -> (Option<u64>, u64) {
        let mut opens = tcp::passive_opens().ok();
        let mut own = 0;
        for _ in 0..COUNTER_READS {
            own = self.accepts.load(Ordering::SeqCst) + self.queued();
            let again = tcp::passive_opens().ok();
            if again == opens {
                break;
            }
            opens = again;
        }
        (opens, own)
    }

    /// Connections waiting in the probe listener's accept queue: for a listening socket the
    /// kernel's TCP_INFO reports it as `tcpi_unacked`.
    fn queued(&self) -> u64 {
        let Some(listener) = &self.listener else {
            return 0;
        };
        // SAFETY: tcp_info is plain integers, for which all zeroes is a valid value.
        let mut info: nix::libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<nix::libc::tcp_info>() as nix::libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `info`, which we own; the descriptor
        // is kept open by `listener`.
        let read = unsafe {
            nix::libc::getsockopt(
                listener.as_raw_fd(),
                nix::libc::IPPROTO_TCP,
                nix::libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        if read == 0 && info.tcpi_state == TCP_LISTEN {
            u64::from(info.tcpi_unacked)
        } else {
            0
        }
    }
}

async fn discover_ports(
    sampler: Option<TcpSampler>,
    app: Pid,
    own_port: u16,
) -> (Option<TcpSampler>, Vec<u16>) {
    off_thread(sampler, move |sampler| {
        let mut listeners = tcp::listeners(sampler.as_mut());
        listeners.retain(|listener| listener.port != own_port);
        tcp::listening_ports_of_tree(app, &listeners)
    })
    .await
}

pub fn lock(traffic: &SharedTraffic) -> std::sync::MutexGuard<'_, Traffic> {
    crate::sync::lock(traffic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn connections_waiting_to_be_accepted_count_as_the_probe_port_s() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let own = OwnPort {
            port: addr.port(),
            listener: Some(Arc::new(std::os::fd::OwnedFd::from(
                listener.try_clone().unwrap(),
            ))),
            accepts: Arc::new(AtomicU64::new(5)),
        };
        let waiting: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(MS(50));
        assert_eq!(own.queued(), 3);
        let (opens, share) = own.passive_opens();
        assert!(opens.is_some());
        assert_eq!(share, 8, "5 accepted, 3 waiting");
        let _accepted = listener.accept().unwrap();
        own.accepts.fetch_add(1, Ordering::SeqCst);
        assert_eq!(own.passive_opens().1, 8);
        drop(waiting);
    }

    fn conn(cookie: u64, bytes: u64) -> Connection {
        Connection {
            local_port: 8080,
            remote: SocketAddr::from(([10, 0, 0, 1], 40000 + cookie as u16)),
            // Not yet accepted: no inode, which is why connections are told apart by cookie.
            inode: 0,
            cookie,
            bytes_received: Some(bytes),
        }
    }

    fn obs(passive: u64, own: u64, conns: Vec<Connection>) -> Observation {
        Observation {
            passive_opens: Some(passive),
            own_accepts: own,
            connections: Some(conns),
        }
    }

    #[test]
    fn new_connections_count_but_drainits_own_probe_connections_do_not() {
        let t0 = Instant::now();
        let mut traffic = Traffic::new(vec![8080], t0);
        assert_eq!(
            traffic.observe(obs(100, 40, vec![]), t0),
            0,
            "the first look is the baseline"
        );
        // Three probe connections to drainit and nothing else.
        assert_eq!(traffic.observe(obs(103, 43, vec![]), t0 + MS(100)), 0);
        // One app connection (already closed again: only the counter saw it).
        assert_eq!(traffic.observe(obs(104, 43, vec![]), t0 + MS(200)), 1);
        assert_eq!(traffic.last_new_connection, Some(t0 + MS(200)));
    }

    #[test]
    fn a_probe_counted_before_drainit_accepted_it_is_not_counted_twice() {
        let t0 = Instant::now();
        let mut traffic = Traffic::new(vec![8080], t0);
        traffic.observe(obs(10, 5, vec![]), t0);
        // The kernel counted a probe connection drainit has not accepted yet: looks like one.
        assert_eq!(traffic.observe(obs(11, 5, vec![]), t0 + MS(100)), 1);
        // Accepted now: the balance goes back, and nothing new is counted.
        assert_eq!(traffic.observe(obs(11, 6, vec![]), t0 + MS(200)), 0);
        assert_eq!(traffic.observe(obs(12, 7, vec![]), t0 + MS(300)), 0);
        // A real arrival later on is still seen.
        assert_eq!(traffic.observe(obs(13, 7, vec![]), t0 + MS(400)), 1);
    }

    #[test]
    fn bytes_on_kept_alive_connections_are_activity_open_idle_ones_are_not() {
        let t0 = Instant::now();
        let mut traffic = Traffic::new(vec![8080], t0);
        traffic.observe(obs(5, 0, vec![conn(1, 100), conn(2, 100)]), t0);
        assert_eq!(
            traffic.observe(obs(5, 0, vec![conn(1, 180), conn(2, 100)]), t0 + MS(100)),
            1
        );
        assert_eq!(traffic.last_activity, Some(t0 + MS(100)));
        // Both still open, nothing received: quiet, however many connections the pool keeps.
        assert_eq!(
            traffic.observe(obs(5, 0, vec![conn(1, 180), conn(2, 100)]), t0 + MS(200)),
            0
        );
        assert_eq!(traffic.open_connections, 2);
        // Quiet is vouched for up to the last look only.
        assert_eq!(traffic.quiet_for(t0), MS(100));
        traffic.observe(obs(5, 0, vec![conn(1, 180), conn(2, 100)]), t0 + MS(1200));
        assert_eq!(traffic.quiet_for(t0), MS(1100));
    }

    #[test]
    fn only_arrivals_surely_after_the_stop_signal_are_late() {
        let t0 = Instant::now();
        let mut traffic = Traffic::new(vec![8080], t0);
        traffic.observe(obs(5, 0, vec![conn(1, 100)]), t0);
        traffic.mark_stopped(t0 + MS(50));
        // Readings straddling the stop: a request just before it is not late.
        traffic.observe(obs(6, 0, vec![conn(1, 150)]), t0 + MS(100));
        assert_eq!(traffic.late_events, 0);
        // A new connection, the previous counter reading having been after the stop.
        traffic.observe(obs(7, 0, vec![conn(1, 150)]), t0 + MS(200));
        assert_eq!(traffic.late_events, 1);
        // Bytes on a kept-alive connection, previous socket reading after the stop.
        traffic.observe(obs(7, 0, vec![conn(1, 200)]), t0 + MS(300));
        assert_eq!(traffic.late_events, 2);
    }

    #[test]
    fn dumps_before_the_drain_slow_down_with_thousands_of_connections() {
        assert_eq!(dump_interval_before_drain(0), Duration::from_secs(2));
        assert_eq!(dump_interval_before_drain(1000), Duration::from_secs(2));
        assert_eq!(dump_interval_before_drain(2000), Duration::from_secs(4));
        assert_eq!(
            dump_interval_before_drain(usize::MAX),
            SKIPPED_DUMPS_AT_MOST
        );
    }

    #[test]
    fn a_socket_dump_is_needed_only_with_connections_open_or_accepted() {
        let t0 = Instant::now();
        let mut traffic = Traffic::new(vec![8080], t0);
        assert!(traffic.sockets_may_have_changed(), "never looked");
        traffic.observe(obs(5, 2, vec![]), t0);
        assert!(!traffic.sockets_may_have_changed());
        // Only drainit's own probe connections: still nothing to see.
        traffic.observe(
            Observation {
                connections: None,
                ..obs(7, 4, vec![])
            },
            t0 + MS(250),
        );
        assert!(!traffic.sockets_may_have_changed());
        // The app accepted one.
        traffic.observe(
            Observation {
                connections: None,
                ..obs(8, 4, vec![])
            },
            t0 + MS(500),
        );
        assert!(traffic.sockets_may_have_changed());
        // The dump sees it open: keep looking while it is.
        traffic.observe(obs(8, 4, vec![conn(1, 10)]), t0 + MS(750));
        assert!(traffic.sockets_may_have_changed());
        traffic.observe(obs(8, 4, vec![]), t0 + MS(1000));
        assert!(!traffic.sockets_may_have_changed());
    }

    #[test]
    fn without_the_counter_unseen_sockets_stand_for_new_connections() {
        let t0 = Instant::now();
        let mut traffic = Traffic::new(vec![8080], t0);
        let blind = |conns| Observation {
            passive_opens: None,
            own_accepts: 0,
            connections: Some(conns),
        };
        traffic.observe(blind(vec![conn(1, 10)]), t0);
        assert_eq!(
            traffic.observe(blind(vec![conn(1, 10), conn(2, 50)]), t0 + MS(100)),
            1
        );
    }

    #[test]
    fn rate_from_steady_slow_and_bursty_arrivals() {
        let t0 = Instant::now();
        // Steady: one new connection per 100 ms sample for 10 s = 10/s.
        let mut steady = Traffic::new(vec![], t0);
        for i in 0..=100u64 {
            steady.observe(obs(i, 0, vec![]), t0 + MS(i * 100));
        }
        let rate = steady.rate(t0 + MS(10_000)).unwrap();
        assert!((rate - 10.0).abs() < 0.5, "{rate}");
        // Slow: 3 a second for 20 s.
        let mut slow = Traffic::new(vec![], t0);
        for i in 0..=60u64 {
            slow.observe(obs(i, 0, vec![]), t0 + MS(i * 333));
        }
        let rate = slow.rate(t0 + MS(20_000)).unwrap();
        assert!((rate - 3.0).abs() < 0.2, "{rate}");
        // Bursty: 50 at once every 5 s over 20 s = 10/s on average.
        let mut bursty = Traffic::new(vec![], t0);
        let mut total = 0;
        for i in 0..=4u64 {
            bursty.observe(obs(total, 0, vec![]), t0 + MS(i * 5000));
            total += 50;
            bursty.observe(obs(total, 0, vec![]), t0 + MS(i * 5000 + 100));
        }
        let rate = bursty.rate(t0 + MS(20_100)).unwrap();
        assert!((rate - 12.4).abs() < 1.0, "{rate}");
        // Busy for just one second (four samples): 90 events are plenty to measure.
        let mut brief = Traffic::new(vec![], t0);
        for (i, total) in [0u64, 30, 60, 90].into_iter().enumerate() {
            brief.observe(obs(total, 0, vec![]), t0 + MS(i as u64 * 333));
        }
        let rate = brief
            .rate(t0 + MS(1000))
            .expect("a rate from one busy second");
        assert!((rate - 90.0).abs() < 1.0, "{rate}");
        // Too few events: no rate.
        let mut idle = Traffic::new(vec![], t0);
        idle.observe(obs(0, 0, vec![]), t0);
        idle.observe(obs(2, 0, vec![]), t0 + MS(5000));
        assert_eq!(idle.rate(t0 + MS(10_000)), None);
    }

    #[test]
    fn the_auto_quiet_period_follows_the_rate_within_bounds() {
        let max = Duration::from_secs(30);
        let fast = QuietPeriod::Auto.resolve(Some(200.0), max).period;
        assert_eq!(fast, MIN_QUIET, "at 200/s, 35 ms would do: never under 1 s");
        // 3/s over a 30 s drain: 90 chances of a gap, ln(90,000)/3 = 3.80 s.
        let Quiet {
            period: slow,
            reason: why,
        } = QuietPeriod::Auto.resolve(Some(3.0), max);
        assert!((slow.as_secs_f64() - 3.80).abs() < 0.01, "{slow:?}");
        assert!(why.contains("3.00 arrivals/s"), "{why}");
        // The shorter the drain, the fewer chances: 3/s over 5 s gives ln(15,000)/3 = 3.21 s.
        let short = QuietPeriod::Auto
            .resolve(Some(3.0), Duration::from_secs(5))
            .period;
        assert!((short.as_secs_f64() - 3.21).abs() < 0.01, "{short:?}");
        let rare = QuietPeriod::Auto.resolve(Some(0.1), max).period;
        assert_eq!(rare, max, "80 s would do: never past --drain-max");
        let Quiet {
            period: unknown,
            reason: why,
        } = QuietPeriod::Auto.resolve(None, max);
        assert_eq!(unknown, max);
        assert!(why.contains("too little traffic"), "{why}");
        assert_eq!(
            QuietPeriod::Fixed(MS(700)).resolve(Some(5.0), max).period,
            MS(700)
        );
    }
}
