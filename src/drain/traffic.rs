//! The `traffic` watcher: has the app stopped receiving requests? Observed from the kernel's TCP
//! counters (never in the data path): new connections accepted in the pod's network namespace
//! (less drainit's own probe connections), and inbound bytes on every connection to the app's
//! ports. Arrivals are what count, not open connections: keep-alive pools hold connections open
//! long after a load balancer stopped using them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use super::arrivals::{self, AgeSamples, Rate, RateSource};
use super::evidence::Quiet;
use super::sampling::{FIRST_LOOK_AFTER, Jitter, Known, Plan, Stage};
use crate::lifecycle::State;
use crate::tasks;
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
    /// Sockets (by cookie) to the namespace's other listening ports, not the app's nor
    /// drainit's, when they were read (during the drain): what explains the passive opens that
    /// are not the app's (a metrics sidecar scraped, or under `hostNetwork` the whole node).
    pub others: Option<Vec<u64>>,
}

/// What the watcher has seen so far.
#[derive(Debug)]
pub struct Traffic {
    /// The app's serving ports, given or discovered.
    pub ports: Vec<u16>,
    /// Bytes received so far by each connection, by socket cookie.
    bytes_by_socket: HashMap<u64, Option<u64>>,
    accepts: Accepts,
    /// Times of observed activity (a sample's event count), for the rate before the drain.
    events: VecDeque<(Instant, u32)>,
    /// The pod's age readings (the youngest socket's), for the rate from socket ages.
    ages: AgeSamples,
    /// The latest a request can have arrived (the app's, or unattributed): what quiet is
    /// counted from.
    pub last_activity: Option<Instant>,
    /// The earliest the last arrival can have been: what a reading with no socket to read
    /// counts the pod's age from (never younger than the truth).
    surely_arrived: Option<Instant>,
    /// The last arrival seen on the app's own sockets (from their ages) or on new connections
    /// attributed to its ports.
    pub last_app_arrival: Option<Instant>,
    pub last_new_connection: Option<Instant>,
    /// Sockets to other listening ports at the last reading of them (None before the first:
    /// that one is the baseline, it explains nothing).
    other_sockets: Option<HashSet<u64>>,
    /// Passive opens during the drain no socket explained (a short connection come and gone
    /// between readings, on the app's ports or another's): counted as the app's, at the reading.
    pub unattributed_connections: u64,
    read: LastRead,
    late: LateArrivals,
    pub open_connections: usize,
    pub started: Instant,
    /// Why the watcher cannot see everything, if so.
    pub blind_spot: Option<String>,
}

/// The app's accepted connections: the namespace's passive opens less the connections to the
/// probe port (see [`OwnPort::passive_opens`] for how a flood of those is kept out).
#[derive(Debug, Default)]
struct Accepts {
    /// At the last reading of the counter.
    last: Option<u64>,
    /// As of the last socket dump.
    at_last_dump: Option<u64>,
}

impl Accepts {
    /// Takes in a reading; returns how many are new since the last one (none at the first).
    fn counted(&mut self, app_accepts: u64) -> u64 {
        let new = self
            .last
            .map_or(0, |before| app_accepts.saturating_sub(before));
        self.last = Some(app_accepts);
        new
    }
}

/// Whether a look during the drain reads the other listeners' sockets: for the first baseline,
/// then only when the app's share of the counter moved (every dump of them walks every socket of
/// the namespace, TIME_WAIT included: at 10 looks a second that is most of the drain's cost).
/// Skipping looks with no new accept loses nothing: no socket to explain was accepted then.
/// The counter is read a moment before the dump: a sidecar's connection accepted in between
/// explains an increment of the look before it was counted, which can hide one short app
/// connection come and gone in the same look (a connection still open is seen on its own).
#[derive(Debug, Clone, Copy)]
struct Attribution {
    has_baseline: bool,
    /// The app's accepts (less drainit's own) at the previous reading of the counter.
    accepts: Option<u64>,
}

impl Attribution {
    fn needs_others(self, accepts_now: Option<u64>) -> bool {
        // Without the counter there is nothing for them to explain.
        accepts_now.is_some() && (!self.has_baseline || accepts_now != self.accepts)
    }
}

/// What one socket dump shows that the previous one did not.
#[derive(Debug, Default)]
struct SocketNews {
    /// Connections not in the previous dump.
    unseen: u64,
    /// Of those, the ones past their handshake (counted as passive opens).
    unseen_accepted: u64,
    /// The latest of their arrivals.
    newest_unseen: Option<Instant>,
    /// Connections that received bytes since the previous dump.
    receiving: u64,
    /// New or receiving connections without an age (no tcp_info): known only from the reading.
    fresh_unaged: u64,
    /// The latest arrival on new or receiving connections, from their ages, and the earliest it
    /// can have been.
    newest: Option<Instant>,
    earliest_newest: Option<Instant>,
}

/// When each kernel source was last read: quiet is only vouched for up to then.
#[derive(Debug, Default, Clone, Copy)]
struct LastRead {
    counter: Option<Instant>,
    sockets: Option<Instant>,
}

/// Events that surely came after the stop signal: requests that arrived after the drain ended.
/// Only readings whose previous reading was already after the stop count: the first one after it
/// also holds what arrived just before.
#[derive(Debug, Default)]
struct LateArrivals {
    /// When the watcher learned the app got its stop signal.
    stopped_at: Option<Instant>,
    events: u64,
}

impl LateArrivals {
    /// Counts `events` read in a window that opened at `previous_reading`, if surely after the stop.
    fn count(&mut self, events: u64, previous_reading: Option<Instant>) {
        if matches!((self.stopped_at, previous_reading), (Some(stop), Some(read)) if read >= stop) {
            self.events += events;
        }
    }
}

impl Traffic {
    pub fn new(ports: Vec<u16>, started: Instant) -> Self {
        Self {
            ports,
            bytes_by_socket: HashMap::new(),
            accepts: Accepts::default(),
            events: VecDeque::new(),
            ages: AgeSamples::default(),
            last_activity: None,
            surely_arrived: None,
            last_app_arrival: None,
            last_new_connection: None,
            other_sockets: None,
            unattributed_connections: 0,
            read: LastRead::default(),
            late: LateArrivals::default(),
            open_connections: 0,
            started,
            blind_spot: None,
        }
    }

    /// Takes in one observation made at `at`; returns how many events (new connections, and
    /// connections that received bytes) it shows.
    pub fn observe(&mut self, observation: Observation, at: Instant) -> u32 {
        let Observation {
            passive_opens,
            own_accepts,
            connections,
            others,
        } = observation;
        let previous = self.read;
        let mut new_connections = 0;
        if let Some(opens) = passive_opens {
            new_connections = self.accepts.counted(opens.saturating_sub(own_accepts));
            self.read.counter = Some(at);
        }
        // New sockets to other listeners explain as many passive opens.
        let explained = others.map(|others| self.take_in_others(others));
        new_connections = new_connections.saturating_sub(explained.unwrap_or(0));
        let counter_read = if passive_opens.is_some() {
            previous.counter
        } else {
            previous.sockets
        };
        // Arrivals known only from a reading: they came after the previous one, at the latest now.
        let mut from_readings: Vec<(Option<Instant>, u64)> = vec![];
        let mut receiving = 0;
        if let Some(connections) = connections {
            let knew_sockets = !self.bytes_by_socket.is_empty();
            let news = self.take_in_sockets(&connections, at);
            // Without the kernel's passive-open counter, connections never seen before stand in.
            if passive_opens.is_none() && knew_sockets {
                new_connections = news.unseen;
            }
            receiving = news.receiving;
            let unattributed = new_connections.saturating_sub(news.unseen_accepted);
            if explained.is_some() {
                self.unattributed_connections += unattributed;
            }
            if new_connections > 0 {
                self.last_new_connection = self.last_new_connection.max(news.newest_unseen);
            }
            if unattributed > 0 {
                self.last_new_connection = Some(at);
            }
            from_readings.push((counter_read, unattributed));
            from_readings.push((previous.sockets, news.fresh_unaged));
            self.arrived(news.newest, news.earliest_newest);
            self.sample_age(arrivals::youngest(&connections), at);
            self.read.sockets = Some(at);
            self.accepts.at_last_dump = self.accepts.last;
        } else {
            from_readings.push((counter_read, new_connections));
            if new_connections > 0 {
                self.last_new_connection = Some(at);
            }
            if self.open_connections == 0 && new_connections == 0 {
                // Nothing open, nothing accepted: no socket could tell the pod's age.
                self.sample_age(None, at);
            }
        }
        for (since, events) in from_readings {
            if events > 0 {
                self.arrived_between(since, at);
            }
        }
        self.late.count(new_connections, counter_read);
        self.late.count(receiving, previous.sockets);
        self.record_activity(new_connections, receiving, at)
    }

    /// An arrival on the app's sockets at `latest` (from their ages), not before `earliest`.
    fn arrived(&mut self, latest: Option<Instant>, earliest: Option<Instant>) {
        self.last_app_arrival = self.last_app_arrival.max(latest);
        self.last_activity = self.last_activity.max(latest);
        self.surely_arrived = self.surely_arrived.max(earliest);
    }

    /// Arrivals known only from a reading at `at`: after `since` (the previous reading; with
    /// none, they may be of any age, and bound nothing).
    fn arrived_between(&mut self, since: Option<Instant>, at: Instant) {
        self.last_activity = self.last_activity.max(Some(at));
        self.surely_arrived = self.surely_arrived.max(since);
    }

    /// Takes in a reading of the pod's age, if one is due: the youngest socket's, or the time
    /// since the last arrival surely was, whichever is younger (both never younger than the truth).
    fn sample_age(&mut self, youngest: Option<Duration>, at: Instant) {
        if !self.ages.due(at) {
            return;
        }
        let since_last = self.surely_arrived.map(|t| at.saturating_duration_since(t));
        let age = match (youngest, since_last) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(age) = age {
            self.ages.record(at, age, RATE_WINDOW);
        }
    }

    /// Takes in the sockets to other listening ports; returns how many are new.
    fn take_in_others(&mut self, others: Vec<u64>) -> u64 {
        let current: HashSet<u64> = others.into_iter().collect();
        let new = self
            .other_sockets
            .as_ref()
            .map_or(0, |before| current.difference(before).count());
        self.other_sockets = Some(current);
        new as u64
    }

    /// Takes in a socket dump made at `at`: what is new since the last one.
    fn take_in_sockets(&mut self, connections: &[Connection], at: Instant) -> SocketNews {
        let mut news = SocketNews::default();
        let mut current = HashMap::with_capacity(connections.len());
        for conn in connections {
            let arrival = conn.last_data_recv.map(|age| {
                (
                    arrivals::arrived(at, age),
                    at.checked_sub(age + arrivals::TICK),
                )
            });
            let fresh = match self.bytes_by_socket.get(&conn.cookie) {
                Some(before) if conn.bytes_received > *before => {
                    news.receiving += 1;
                    true
                }
                Some(_) => false,
                None => {
                    news.unseen += 1;
                    // Past its handshake: the passive open the counter saw.
                    if conn.inode != 0 || conn.bytes_received != Some(0) {
                        news.unseen_accepted += 1;
                        news.newest_unseen = news
                            .newest_unseen
                            .max(Some(arrival.map_or(at, |(latest, _)| latest)));
                    }
                    true
                }
            };
            if fresh {
                match arrival {
                    Some((latest, earliest)) => {
                        news.newest = news.newest.max(Some(latest));
                        news.earliest_newest = news.earliest_newest.max(earliest);
                    }
                    None => news.fresh_unaged += 1,
                }
            }
            current.insert(conn.cookie, conn.bytes_received);
        }
        self.open_connections = connections.len();
        self.bytes_by_socket = current;
        news
    }

    /// Counts the events of a reading at `at`, for the counted rate.
    fn record_activity(&mut self, new_connections: u64, receiving: u64, at: Instant) -> u32 {
        let events = u32::try_from(new_connections + receiving).unwrap_or(u32::MAX);
        if events > 0 {
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

    /// What deciding whether to read the other listeners' sockets needs.
    fn attribution(&self) -> Attribution {
        Attribution {
            has_baseline: self.other_sockets.is_some(),
            accepts: self.accepts.last,
        }
    }

    /// What the sampling plan needs to know.
    pub fn known(&self) -> Known {
        Known {
            ports_known: !self.ports.is_empty(),
            open_connections: self.open_connections,
            sockets_may_have_changed: self.sockets_may_have_changed(),
        }
    }

    /// Whether a socket dump could show anything new: connections to the app were open at the
    /// last one, or the app has accepted connections since (every new one is an accept).
    fn sockets_may_have_changed(&self) -> bool {
        self.open_connections > 0
            || self.accepts.at_last_dump.is_none()
            || self.accepts.at_last_dump != self.accepts.last
    }

    /// The app got its stop signal (first call wins): arrivals from now on are late.
    pub fn mark_stopped(&mut self, at: Instant) {
        self.late.stopped_at.get_or_insert(at);
    }

    /// Arrivals surely after the stop signal, so far.
    pub fn late_events(&self) -> u64 {
        self.late.events
    }

    /// Up to when both kernel sources have been read: quiet is vouched for up to the older
    /// reading (requests on kept-alive connections are seen only by a socket dump, short
    /// connections only by the counter).
    fn last_observed(&self) -> Option<Instant> {
        match (self.read.counter, self.read.sockets) {
            (Some(counter), Some(sockets)) if !self.ports.is_empty() => Some(counter.min(sockets)),
            (counter, sockets) => counter.or(sockets),
        }
    }

    /// The arrival rate over the window before `until`: the higher of the rate from socket ages
    /// and the rate from counted arrivals, both of which never overstate it (see
    /// [`arrivals`]); None if neither has enough readings to say.
    pub fn rate(&self, until: Instant) -> Option<Rate> {
        let from = self.window_start(until);
        let counted = self.counted_rate(until).map(|per_s| Rate {
            per_s,
            source: RateSource::ArrivalCount,
        });
        Rate::max(self.ages.rate(from, until), counted)
    }

    fn window_start(&self, until: Instant) -> Instant {
        until
            .checked_sub(RATE_WINDOW)
            .unwrap_or(self.started)
            .max(self.started)
    }

    /// Events per second over the window before `until`, if enough were seen to say.
    fn counted_rate(&self, until: Instant) -> Option<f64> {
        let from = self.window_start(until);
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
        self.last_observed().map_or(Duration::ZERO, |seen| {
            seen.saturating_duration_since(quiet_from)
        })
    }

    /// What the watcher sees, for `/status` (what the drain decided is published apart).
    pub fn status(&self, now: Instant) -> Value {
        let ago =
            |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t).as_millis() as u64);
        let rate = self.rate(now);
        json!({
            "ports": self.ports,
            "open_connections": self.open_connections,
            "rate_per_s": rate.map(|r| r.per_s),
            "rate_measured_by": rate.map(|r| r.source.label()),
            "last_activity_ms_ago": ago(self.last_activity),
            "last_app_arrival_ms_ago": ago(self.last_app_arrival),
            "unattributed_connections": self.unattributed_connections,
            "last_new_connection_ms_ago": ago(self.last_new_connection),
            "late_events": self.late.events,
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
    pub fn resolve(self, measured: Option<Rate>, max: Duration) -> Quiet {
        let (period, reason) = match (self, measured.map(|r| r.per_s)) {
            (QuietPeriod::Fixed(period), _) => (period, "fixed by --quiet-period".into()),
            (QuietPeriod::Auto, Some(rate)) if rate > 0.0 => {
                let chances = (rate * max.as_secs_f64()).max(1.0);
                let seconds = (chances / MISS_PROBABILITY).ln() / rate;
                let period = Duration::try_from_secs_f64(seconds).unwrap_or(max);
                let clamped = period.clamp(MIN_QUIET, max.max(MIN_QUIET));
                let how = measured.map_or("", |r| r.source.label());
                let why = format!(
                    "auto: {rate:.2} arrivals/s before the drain ({how}); a {period:.1?} gap has a 0.1% chance within --drain-max"
                );
                (clamped, why)
            }
            (QuietPeriod::Auto, _) => (
                max,
                "auto: too little traffic before the drain to measure, using --drain-max".into(),
            ),
        };
        Quiet {
            period,
            reason,
            rate_per_s: measured.map(|r| r.per_s),
            rate_measured_by: measured.map(|r| r.source),
        }
    }
}

/// Shared between the sampling task (writer), the drain and `/status` (readers).
pub type SharedTraffic = Arc<Mutex<Traffic>>;

/// Samples the kernel's counters for the app's ports until the process exits; runs from start-up
/// so the rate before the drain is known when it begins. Also logs requests that arrive after the
/// stop signal: the drain ended too early. What to read when is the [`Plan`]'s call.
pub async fn monitor(
    traffic: SharedTraffic,
    app: Option<Pid>,
    given_ports: Vec<u16>,
    own_port: OwnPort,
    mut state: watch::Receiver<State>,
    late_arrivals: Counter,
) {
    let mut sampler = open_sampler(&traffic);
    let mut plan = Plan::new(given_ports.is_empty());
    let mut jitter = Jitter::seeded();
    let _ = tokio::time::timeout(FIRST_LOOK_AFTER, state.changed()).await;
    if !state.borrow().is_alive() {
        return;
    }
    loop {
        let current = *state.borrow_and_update();
        let stage = Stage::of(current.traffic_phase());
        let look = plan.look(stage, lock(&traffic).known(), Instant::now());
        if look.marks_stop {
            lock(&traffic).mark_stopped(Instant::now());
        }
        if look.discover_ports {
            let ports;
            (sampler, ports) = discover_ports(sampler.take(), app, own_port.port).await;
            plan.ports_looked_up(Instant::now());
            use_ports(&traffic, ports);
        }
        let ports = look.dump_sockets.then(|| lock(&traffic).ports.clone());
        let attribute = (look.dump_sockets && stage != Stage::BeforeDrain)
            .then(|| lock(&traffic).attribution());
        let observation;
        (sampler, observation) = observe(sampler.take(), ports, attribute, own_port.clone()).await;
        if look.dump_sockets {
            plan.sockets_read(Instant::now());
        }
        let late = {
            let mut traffic = lock(&traffic);
            let late_before = traffic.late_events();
            traffic.observe(observation, Instant::now());
            traffic.late_events() - late_before
        };
        report_late(late, current.drain_started(), &late_arrivals);
        if stage == Stage::Exited {
            return;
        }
        // Wake early when the phase changes, so sampling speeds up as soon as the drain starts.
        let _ = tokio::time::timeout(jitter.next_look_in(stage), state.changed()).await;
    }
}

/// The socket sampler, if sock_diag is available; if not, the watcher's blind spot says so.
fn open_sampler(traffic: &SharedTraffic) -> Option<TcpSampler> {
    TcpSampler::new()
        .inspect_err(|e| {
            let why = format!(
                "sock_diag unavailable ({e}): only new connections are seen, not requests on kept-alive ones"
            );
            warn!(event = "traffic_watcher_degraded", "traffic watcher: {why}");
            lock(traffic).blind_spot = Some(why);
        })
        .ok()
}

fn use_ports(traffic: &SharedTraffic, ports: Vec<u16>) {
    let mut traffic = lock(traffic);
    if traffic.ports != ports {
        info!(event = "app_ports_found", ports = ?ports, "traffic watcher: app ports");
        traffic.ports = ports;
    }
}

fn report_late(late: u64, drain_started: Option<Instant>, late_arrivals: &Counter) {
    if late > 0 {
        late_arrivals.inc_by(late);
        warn!(
            event = "late_arrival",
            events = late,
            elapsed_ms = drain_started.map(|t| t.elapsed().as_millis() as u64),
            "late arrival: requests reached the app after its stop signal (the drain ended too early)"
        );
    }
}

/// Runs a blocking kernel query off the async thread: a slow dump must never hold up signals.
async fn off_thread<T: Default + Send + 'static>(
    sampler: Option<TcpSampler>,
    query: impl FnOnce(&mut Option<TcpSampler>) -> T + Send + 'static,
) -> (Option<TcpSampler>, T) {
    let result = tasks::spawn_blocking(move || {
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

/// Reads the connection counter, and the app's sockets when `ports` is given; with `attribute`,
/// the sockets to the namespace's other listeners too if they could explain anything.
async fn observe(
    sampler: Option<TcpSampler>,
    ports: Option<Vec<u16>>,
    attribute: Option<Attribution>,
    own_port: OwnPort,
) -> (Option<TcpSampler>, Observation) {
    off_thread(sampler, move |sampler| {
        let (passive_opens, own_accepts) = own_port.passive_opens();
        let app_accepts = passive_opens.map(|opens| opens.saturating_sub(own_accepts));
        let attribute = attribute.is_some_and(|a| a.needs_others(app_accepts));
        let (connections, others) = match (ports, sampler.as_mut()) {
            (Some(ports), Some(sampler)) => read_sockets(sampler, &ports, attribute, own_port.port),
            _ => (None, None),
        };
        Observation {
            passive_opens,
            own_accepts,
            connections,
            others,
        }
    })
    .await
}

/// The app's connections and, with `attribute`, the sockets to every other listening port but
/// drainit's own (whose connections are counted apart).
fn read_sockets(
    sampler: &mut TcpSampler,
    ports: &[u16],
    attribute: bool,
    own_port: u16,
) -> (Option<Vec<Connection>>, Option<Vec<u64>>) {
    let others: Option<Vec<u16>> =
        attribute
            .then(|| sampler.listeners().ok())
            .flatten()
            .map(|mut listeners| {
                listeners.retain(|l| l.port != own_port && !ports.contains(&l.port));
                tcp::ports_of(&listeners)
            });
    match sampler.sockets(ports, others.as_deref().unwrap_or(&[])) {
        Ok(dump) => (Some(dump.connections), others.map(|_| dump.others)),
        Err(_) => (None, None),
    }
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

/// The app's ports: those its processes listen on, or with no app process (a sidecar, `None`)
/// every port listening in the network namespace but drainit's own.
async fn discover_ports(
    sampler: Option<TcpSampler>,
    app: Option<Pid>,
    own_port: u16,
) -> (Option<TcpSampler>, Vec<u16>) {
    off_thread(sampler, move |sampler| {
        let mut listeners = tcp::listeners(sampler.as_mut());
        listeners.retain(|listener| listener.port != own_port);
        match app {
            Some(app) => tcp::listening_ports_of_tree(app, &listeners),
            None => tcp::ports_of(&listeners),
        }
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
        // The kernel completes a loopback handshake before connect returns; the listener's
        // side is updated within moments: wait for it, without assuming how long it takes.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while own.queued() < 3 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
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
            last_data_recv: None,
        }
    }

    fn obs(passive: u64, own: u64, conns: Vec<Connection>) -> Observation {
        Observation {
            passive_opens: Some(passive),
            own_accepts: own,
            connections: Some(conns),
            others: None,
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
        assert_eq!(traffic.late_events(), 0);
        // A new connection, the previous counter reading having been after the stop.
        traffic.observe(obs(7, 0, vec![conn(1, 150)]), t0 + MS(200));
        assert_eq!(traffic.late_events(), 1);
        // Bytes on a kept-alive connection, previous socket reading after the stop.
        traffic.observe(obs(7, 0, vec![conn(1, 200)]), t0 + MS(300));
        assert_eq!(traffic.late_events(), 2);
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
            others: None,
        };
        traffic.observe(blind(vec![conn(1, 10)]), t0);
        assert_eq!(
            traffic.observe(blind(vec![conn(1, 10), conn(2, 50)]), t0 + MS(100)),
            1
        );
    }

    fn aged(cookie: u64, bytes: u64, age_ms: u64) -> Connection {
        Connection {
            inode: 1,
            last_data_recv: Some(MS(age_ms)),
            ..conn(cookie, bytes)
        }
    }

    #[test]
    fn the_last_request_is_when_its_data_arrived_not_when_it_was_read() {
        let t0 = Instant::now();
        let mut traffic = Traffic::new(vec![8080], t0);
        traffic.observe(obs(5, 0, vec![aged(1, 100, 900)]), t0);
        // Read 500 ms later: the data arrived 400 ms before the reading (10 ms jiffy allowance).
        traffic.observe(obs(5, 0, vec![aged(1, 180, 400)]), t0 + MS(500));
        assert_eq!(traffic.last_activity, Some(t0 + MS(110)));
        assert_eq!(traffic.last_app_arrival, Some(t0 + MS(110)));
        assert_eq!(traffic.quiet_for(t0), MS(390));
        // A new connection seen by the dump: when it last received, not the reading.
        traffic.observe(
            obs(6, 0, vec![aged(1, 180, 500), aged(2, 50, 60)]),
            t0 + MS(600),
        );
        assert_eq!(traffic.last_new_connection, Some(t0 + MS(550)));
    }

    #[test]
    fn other_listeners_connections_do_not_hold_the_drain_unexplained_ones_do() {
        let t0 = Instant::now();
        let mut traffic = Traffic::new(vec![8080], t0);
        let with_others = |passive, others: Vec<u64>| Observation {
            others: Some(others),
            ..obs(passive, 0, vec![aged(1, 100, 5000)])
        };
        traffic.observe(with_others(10, vec![70]), t0);
        let before = traffic.last_activity;
        assert!(
            before.is_some_and(|t| t < t0),
            "the open connection's last request"
        );
        // A metrics scrape: one passive open, one new socket to the sidecar's port.
        traffic.observe(with_others(11, vec![70, 71]), t0 + MS(100));
        assert_eq!(traffic.last_activity, before, "{traffic:?}");
        assert_eq!(traffic.unattributed_connections, 0);
        // A short connection nobody saw: counted as the app's, at the reading, and said so.
        traffic.observe(with_others(12, vec![70, 71]), t0 + MS(200));
        assert_eq!(traffic.last_activity, Some(t0 + MS(200)));
        assert_eq!(traffic.last_new_connection, Some(t0 + MS(200)));
        assert_eq!(traffic.unattributed_connections, 1);
        assert_eq!(traffic.last_app_arrival, before);
    }

    #[test]
    fn the_rate_from_socket_ages_counts_requests_on_kept_alive_connections() {
        // 100 requests/s on 3 kept-alive connections: the count sees at most 3 per reading.
        let t0 = Instant::now();
        let mut traffic = Traffic::new(vec![8080], t0);
        for i in 0..=15u64 {
            let bytes = 100 * (i + 1);
            let conns = vec![aged(1, bytes, 4), aged(2, bytes, 12), aged(3, bytes, 30)];
            traffic.observe(obs(3, 0, conns), t0 + MS(i * 2000));
        }
        let rate = traffic.rate(t0 + MS(30_000)).unwrap();
        assert_eq!(rate.source, RateSource::SocketAges);
        assert!(
            rate.per_s > 10.0 && rate.per_s <= arrivals::CEILING,
            "{rate:?}"
        );
        assert!(traffic.counted_rate(t0 + MS(30_000)).unwrap() < 2.0);
    }

    #[test]
    fn idle_readings_still_weigh_in_the_rate() {
        // One burst, then nothing open and nothing accepted: the readings without a dump
        // count the time since the burst, so the rate falls.
        let t0 = Instant::now();
        let mut traffic = Traffic::new(vec![8080], t0);
        traffic.observe(obs(0, 0, vec![aged(1, 100, 5)]), t0);
        traffic.observe(obs(1, 0, vec![]), t0 + MS(250));
        for i in 2..=30u64 {
            traffic.observe(
                Observation {
                    connections: None,
                    ..obs(1, 0, vec![])
                },
                t0 + MS(i * 2000),
            );
        }
        let rate = traffic.ages.rate(t0, t0 + MS(60_000)).unwrap();
        assert!(rate.per_s < 0.1, "{rate:?}");
    }

    #[test]
    fn other_listeners_are_read_for_a_baseline_then_only_when_the_counter_moved() {
        let first = Attribution {
            has_baseline: false,
            accepts: Some(5),
        };
        assert!(first.needs_others(Some(5)));
        let then = Attribution {
            has_baseline: true,
            ..first
        };
        assert!(!then.needs_others(Some(5)));
        assert!(then.needs_others(Some(6)));
        assert!(
            !first.needs_others(None),
            "nothing to explain without the counter"
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
        let rate = steady.counted_rate(t0 + MS(10_000)).unwrap();
        assert!((rate - 10.0).abs() < 0.5, "{rate}");
        // Slow: 3 a second for 20 s.
        let mut slow = Traffic::new(vec![], t0);
        for i in 0..=60u64 {
            slow.observe(obs(i, 0, vec![]), t0 + MS(i * 333));
        }
        let rate = slow.counted_rate(t0 + MS(20_000)).unwrap();
        assert!((rate - 3.0).abs() < 0.2, "{rate}");
        // Bursty: 50 at once every 5 s over 20 s = 10/s on average.
        let mut bursty = Traffic::new(vec![], t0);
        let mut total = 0;
        for i in 0..=4u64 {
            bursty.observe(obs(total, 0, vec![]), t0 + MS(i * 5000));
            total += 50;
            bursty.observe(obs(total, 0, vec![]), t0 + MS(i * 5000 + 100));
        }
        let rate = bursty.counted_rate(t0 + MS(20_100)).unwrap();
        assert!((rate - 12.4).abs() < 1.0, "{rate}");
        // Busy for just one second (four samples): 90 events are plenty to measure.
        let mut brief = Traffic::new(vec![], t0);
        for (i, total) in [0u64, 30, 60, 90].into_iter().enumerate() {
            brief.observe(obs(total, 0, vec![]), t0 + MS(i as u64 * 333));
        }
        let rate = brief
            .counted_rate(t0 + MS(1000))
            .expect("a rate from one busy second");
        assert!((rate - 90.0).abs() < 1.0, "{rate}");
        // Too few events: no rate.
        let mut idle = Traffic::new(vec![], t0);
        idle.observe(obs(0, 0, vec![]), t0);
        idle.observe(obs(2, 0, vec![]), t0 + MS(5000));
        assert_eq!(idle.counted_rate(t0 + MS(10_000)), None);
    }

    fn counted(per_s: f64) -> Option<Rate> {
        Some(Rate {
            per_s,
            source: RateSource::ArrivalCount,
        })
    }

    #[test]
    fn the_auto_quiet_period_follows_the_rate_within_bounds() {
        let max = Duration::from_secs(30);
        let fast = QuietPeriod::Auto.resolve(counted(200.0), max).period;
        assert_eq!(fast, MIN_QUIET, "at 200/s, 35 ms would do: never under 1 s");
        // 3/s over a 30 s drain: 90 chances of a gap, ln(90,000)/3 = 3.80 s.
        let Quiet {
            period: slow,
            reason: why,
            ..
        } = QuietPeriod::Auto.resolve(counted(3.0), max);
        assert!((slow.as_secs_f64() - 3.80).abs() < 0.01, "{slow:?}");
        assert!(why.contains("3.00 arrivals/s"), "{why}");
        // The shorter the drain, the fewer chances: 3/s over 5 s gives ln(15,000)/3 = 3.21 s.
        let short = QuietPeriod::Auto
            .resolve(counted(3.0), Duration::from_secs(5))
            .period;
        assert!((short.as_secs_f64() - 3.21).abs() < 0.01, "{short:?}");
        let rare = QuietPeriod::Auto.resolve(counted(0.1), max).period;
        assert_eq!(rare, max, "80 s would do: never past --drain-max");
        let Quiet {
            period: unknown,
            reason: why,
            ..
        } = QuietPeriod::Auto.resolve(None, max);
        assert_eq!(unknown, max);
        assert!(why.contains("too little traffic"), "{why}");
        assert_eq!(
            QuietPeriod::Fixed(MS(700))
                .resolve(counted(5.0), max)
                .period,
            MS(700)
        );
    }
}
