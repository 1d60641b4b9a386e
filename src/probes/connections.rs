//! Connection limits of the probe server: every client in the cluster can connect, so the number
//! of connections is bounded, per client address and in total, and a new connection is never
//! refused for lack of room: the least recently active connection of the address holding the
//! most is cut instead (HAProxy and Envoy shed the same way). The kubelet opens one short
//! connection per probe and sends its request at once, so it is always the newest and never the
//! one cut, however many idle or slow connections others hold.
//!
//! A connection costs a socket and a small task until its client sends something; from then on
//! hyper's buffers (about 20 kB resident), so fewer connections may be past that point.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Notify;

/// Far above what the kubelet and a fleet of load-balancer nodes need, and above the 2,000 a
/// hostile crowd is expected to hold: below that, each newcomer would cut a connection whose
/// client reconnects at once, and the churn would keep the kubelet waiting in the accept queue.
/// A connection that has sent nothing costs about 1.5 kB: 3 MB at most.
pub const MAX_CONNECTIONS: usize = 2048;
/// Connections being read or answered (past their first byte): each holds hyper's buffers
/// (about 13 kB resident), so together about 0.4 MB.
pub const MAX_SERVING: usize = 32;
/// One address (a node, a pod) holds at most this many: the others keep their room.
pub const MAX_PER_ADDRESS: usize = 64;
/// File descriptors kept free for drainit's own needs (signals, control channel, netlink); under
/// a tiny open-file limit, three quarters of it.
const FD_RESERVE: usize = 64;
/// Probes send a few header lines at once; anything slower is not a probe. Also how long a
/// connection may stay silent (before its first request, or between requests).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Under pressure (over half the serving room taken, or three quarters of all connections), a
/// client must send its first byte, or its request, within this: enough for a client across a
/// slow network, too short to hoard connections. (Shorter only makes a crowd that reconnects at
/// once churn faster: 500 ms doubled the 99th percentile of kubelet probes under 2,000.)
pub const HEADER_TIMEOUT_UNDER_PRESSURE: Duration = Duration::from_secs(2);

/// The connection cap: [`MAX_CONNECTIONS`], or less when the open-file limit is lower, so that
/// accepting never fails for lack of descriptors.
pub fn capacity() -> usize {
    let mut limit = nix::libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct that we own.
    let read = unsafe { nix::libc::getrlimit(nix::libc::RLIMIT_NOFILE, &mut limit) } == 0;
    let fds = if read {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    let room = fds.saturating_sub(FD_RESERVE).max(fds / 4);
    MAX_CONNECTIONS.min(room).max(1)
}

/// The header timeout: shorter once `taken` reaches `room`.
fn under_pressure(taken: usize, room: usize) -> Duration {
    if taken >= room {
        HEADER_TIMEOUT_UNDER_PRESSURE
    } else {
        HEADER_TIMEOUT
    }
}

/// Hands freed heap pages back to the kernel. glibc keeps the pages of freed small blocks (a
/// crowd's buffers) resident until asked; musl returns them by itself.
pub fn give_back_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; it takes the allocator's own lock.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Every open probe connection: its address, when it was last active, and how to cut it.
#[derive(Debug)]
pub struct Registry {
    capacity: usize,
    per_address: usize,
    serving_capacity: usize,
    next_id: u64,
    open: HashMap<u64, Open>,
    by_address: HashMap<IpAddr, usize>,
    /// Connections cut to make room, for the metrics and the log.
    pub cut: u64,
    /// More than [`CROWD`] connections were open since the last time none was.
    crowd_seen: bool,
    /// Wakes a slow client waiting for room among the serving connections.
    slot_freed: Arc<Notify>,
}

/// Past this many open connections, memory is worth handing back once they are gone.
const CROWD: usize = 32;

#[derive(Debug)]
struct Open {
    addr: IpAddr,
    last_active: Instant,
    /// Cut if it is not serving by then (silent, or a slow client waiting for room).
    serving_by: Instant,
    /// Past its first byte: holding hyper's buffers.
    serving: bool,
    /// A `/drain/wait` waiter: no buffers, no deadline; cut only to make room.
    parked: bool,
    cut: Arc<Notify>,
}

/// A connection's place in the registry; cut when [`Admitted::cut`] is notified.
#[derive(Debug)]
pub struct Admitted {
    pub id: u64,
    pub cut: Arc<Notify>,
}

/// How often connections past their time to start are looked for: one sweep instead of a timer
/// per connection (a timer would double an idle connection's memory).
pub const SWEEP_EVERY: Duration = Duration::from_millis(100);

pub type SharedRegistry = Arc<Mutex<Registry>>;

pub fn lock(registry: &SharedRegistry) -> std::sync::MutexGuard<'_, Registry> {
    crate::sync::lock(registry)
}

impl Registry {
    pub fn new(capacity: usize, per_address: usize, serving: usize) -> Self {
        Self {
            capacity,
            per_address: per_address.min(capacity),
            serving_capacity: serving.min(capacity),
            next_id: 0,
            open: HashMap::new(),
            by_address: HashMap::new(),
            cut: 0,
            crowd_seen: false,
            slot_freed: Arc::new(Notify::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Takes in a new connection from `addr`, first cutting whichever connection must make
    /// room for it.
    pub fn admit(&mut self, addr: IpAddr, now: Instant) -> Admitted {
        if self.by_address.get(&addr).copied().unwrap_or(0) >= self.per_address {
            self.cut_stalest(|open| open.addr == addr);
        }
        if self.open.len() >= self.capacity {
            self.make_room();
        }
        let first_byte_timeout = under_pressure(self.open.len() * 4, self.capacity * 3);
        let id = self.next_id;
        self.next_id += 1;
        let cut = Arc::new(Notify::new());
        self.open.insert(
            id,
            Open {
                addr,
                last_active: now,
                serving_by: now + first_byte_timeout,
                serving: false,
                parked: false,
                cut: cut.clone(),
            },
        );
        *self.by_address.entry(addr).or_default() += 1;
        self.crowd_seen |= self.open.len() > CROWD;
        Admitted { id, cut }
    }

    /// Connection `id` sent its first bytes, `complete` telling whether they hold a whole
    /// request head (a probe's does). It takes hyper's buffers if there is room; when too many
    /// hold them, a whole request takes the place of the stalest (of the address holding the
    /// most), while a partial one, a slow client, waits for room (`None`: wait on
    /// [`Registry::slot_freed`] and ask again; it costs no buffers meanwhile, and turning it
    /// away would only bring it back at once). Returns how long it may take to send a
    /// request's headers.
    pub fn start_serving(&mut self, id: u64, now: Instant, complete: bool) -> Option<Duration> {
        let serving = self.open.values().filter(|open| open.serving).count();
        if serving >= self.serving_capacity {
            if !complete {
                return None;
            }
            let heaviest = self.heaviest_address(|open| open.serving);
            self.cut_stalest(|open| open.serving && Some(open.addr) == heaviest);
        }
        let open = self.open.get_mut(&id)?;
        open.serving = true;
        open.last_active = now;
        Some(under_pressure(serving * 2, self.serving_capacity))
    }

    /// Cuts the connections that are not serving by their time (silent ones, slow clients that
    /// waited for room in vain); returns how many.
    pub fn cut_late(&mut self, now: Instant) -> usize {
        let late: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, open)| !open.serving && !open.parked && open.serving_by <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &late {
            if let Some(open) = self.open.get(id) {
                open.cut.notify_one();
            }
            self.remove(*id);
        }
        late.len()
    }

    pub fn slot_freed(&self) -> Arc<Notify> {
        self.slot_freed.clone()
    }

    /// Cuts the least recently active connection of the address holding the most: when the
    /// registry is full, or accepting failed for lack of file descriptors.
    pub fn make_room(&mut self) {
        let heaviest = self.heaviest_address(|_| true);
        self.cut_stalest(|open| Some(open.addr) == heaviest);
    }

    /// Connection `id` waits for the drain's end (`/drain/wait`): it holds no buffers and has no
    /// deadline to start serving, but may still be cut to make room.
    pub fn park(&mut self, id: u64, now: Instant) {
        if let Some(open) = self.open.get_mut(&id) {
            open.parked = true;
            open.last_active = now;
        }
    }

    /// A request arrived on connection `id`: it is in use, not hoarded.
    pub fn touch(&mut self, id: u64, now: Instant) {
        if let Some(open) = self.open.get_mut(&id) {
            open.last_active = now;
        }
    }

    /// Connection `id` closed: true when that leaves none open after a crowd (time to give the
    /// memory back).
    pub fn close(&mut self, id: u64) -> bool {
        self.remove(id);
        let calm_again = self.crowd_seen && self.open.is_empty();
        self.crowd_seen &= !calm_again;
        calm_again
    }

    fn remove(&mut self, id: u64) {
        let Some(open) = self.open.remove(&id) else {
            return;
        };
        if open.serving {
            self.slot_freed.notify_one();
        }
        if let Some(count) = self.by_address.get_mut(&open.addr) {
            *count -= 1;
            if *count == 0 {
                self.by_address.remove(&open.addr);
            }
        }
    }

    /// The address holding the most connections among those `counted` (of two holding as
    /// many, the one holding the stalest).
    fn heaviest_address(&self, counted: impl Fn(&Open) -> bool) -> Option<IpAddr> {
        let mut held: HashMap<IpAddr, (usize, Instant)> = HashMap::new();
        for open in self.open.values().filter(|open| counted(open)) {
            let (count, stalest) = held.entry(open.addr).or_insert((0, open.last_active));
            *count += 1;
            *stalest = (*stalest).min(open.last_active);
        }
        held.into_iter()
            .max_by_key(|(_, (count, stalest))| (*count, std::cmp::Reverse(*stalest)))
            .map(|(addr, _)| addr)
    }

    /// Cuts the least recently active connection among those `eligible`.
    fn cut_stalest(&mut self, eligible: impl Fn(&Open) -> bool) {
        let stalest = self
            .open
            .iter()
            .filter(|(_, open)| eligible(open))
            .min_by_key(|(id, open)| (open.last_active, **id))
            .map(|(id, _)| *id);
        if let Some(id) = stalest {
            if let Some(open) = self.open.get(&id) {
                open.cut.notify_one();
            }
            self.remove(id);
            self.cut += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;
    const SECS: fn(u64) -> Duration = Duration::from_secs;

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_new_connection_always_gets_in_and_the_heaviest_address_pays() {
        let t0 = Instant::now();
        let mut registry = Registry::new(10, 8, 10);
        let kubelet_old = registry.admit(addr(1), t0);
        let hostile: Vec<Admitted> = (0..9)
            .map(|i| registry.admit(addr(2), t0 + MS(1 + i)))
            .collect();
        assert_eq!(registry.len(), 9, "one of the 9 cut by the per-address cap");
        assert_eq!(registry.cut, 1);
        registry.admit(addr(1), t0 + MS(100));
        registry.admit(addr(1), t0 + MS(101));
        assert_eq!(registry.len(), 10);
        assert_eq!(registry.cut, 2, "address 2 held the most");
        assert!(registry.open.contains_key(&kubelet_old.id));
        assert!(!registry.open.contains_key(&hostile[1].id));
    }

    #[test]
    fn the_least_recently_active_connection_of_an_address_is_cut() {
        let t0 = Instant::now();
        let mut registry = Registry::new(100, 2, 100);
        let busy = registry.admit(addr(1), t0);
        let idle = registry.admit(addr(1), t0 + MS(1));
        registry.touch(busy.id, t0 + MS(50));
        let cut_before = Arc::clone(&idle.cut);
        registry.admit(addr(1), t0 + MS(60));
        assert!(registry.open.contains_key(&busy.id));
        assert!(!registry.open.contains_key(&idle.id));
        // The cut connection's task is woken even if it was not waiting yet.
        let waker = futures_util::FutureExt::now_or_never(cut_before.notified());
        assert!(waker.is_some());
    }

    #[test]
    fn under_pressure_clients_must_speak_sooner() {
        let t0 = Instant::now();
        let mut registry = Registry::new(8, 8, 4);
        for _ in 0..8 {
            registry.admit(addr(1), t0);
        }
        assert_eq!(
            registry.cut_late(t0 + HEADER_TIMEOUT_UNDER_PRESSURE - MS(1)),
            0
        );
        assert_eq!(
            registry.cut_late(t0 + HEADER_TIMEOUT_UNDER_PRESSURE),
            2,
            "6 of 8 taken: the last two"
        );
        assert_eq!(registry.cut_late(t0 + HEADER_TIMEOUT), 6);
        let ids: Vec<u64> = (0..8).map(|_| registry.admit(addr(1), t0).id).collect();
        let headers: Vec<_> = ids
            .iter()
            .map(|id| registry.start_serving(*id, t0, true).unwrap())
            .collect();
        assert_eq!(headers[1], HEADER_TIMEOUT);
        assert_eq!(headers[2], HEADER_TIMEOUT_UNDER_PRESSURE, "2 of 4 serving");
    }

    #[test]
    fn few_connections_hold_buffers_and_newcomers_take_the_stalest_place() {
        let t0 = Instant::now();
        let mut registry = Registry::new(100, 100, 2);
        let slow = registry.admit(addr(2), t0);
        registry.start_serving(slow.id, t0, false);
        let other = registry.admit(addr(3), t0 + MS(1));
        registry.start_serving(other.id, t0 + MS(1), false);
        let slowloris = registry.admit(addr(4), t0 + MS(2));
        assert_eq!(
            registry.start_serving(slowloris.id, t0 + MS(2), false),
            None
        );
        assert!(
            registry.open.contains_key(&slowloris.id),
            "waits, holding no buffers"
        );
        let kubelet = registry.admit(addr(1), t0 + MS(2));
        assert!(
            registry
                .start_serving(kubelet.id, t0 + MS(2), true)
                .is_some()
        );
        assert_eq!(registry.open.values().filter(|o| o.serving).count(), 2);
        assert!(!registry.open.contains_key(&slow.id), "the stalest was cut");
        assert!(registry.open.contains_key(&kubelet.id));
        registry.close(kubelet.id);
        let woken = futures_util::FutureExt::now_or_never(registry.slot_freed().notified());
        assert!(woken.is_some(), "the waiting slow client is told");
        assert!(
            registry
                .start_serving(slowloris.id, t0 + MS(3), false)
                .is_some()
        );
        assert_eq!(
            registry.cut_late(t0 + SECS(60)),
            0,
            "serving: hyper's timeout"
        );
    }

    #[test]
    fn closing_frees_the_address_and_the_room() {
        let t0 = Instant::now();
        let mut registry = Registry::new(4, 4, 4);
        let a = registry.admit(addr(1), t0);
        assert!(!registry.close(a.id), "no crowd");
        assert!(!registry.close(a.id));
        assert!(registry.is_empty());
        assert!(registry.by_address.is_empty());
    }

    #[test]
    fn memory_is_given_back_once_a_crowd_is_gone() {
        let t0 = Instant::now();
        let mut registry = Registry::new(100, 100, 100);
        let crowd: Vec<_> = (0..40).map(|_| registry.admit(addr(1), t0)).collect();
        let (last, rest) = crowd.split_last().unwrap();
        assert!(rest.iter().all(|c| !registry.close(c.id)));
        assert!(registry.close(last.id));
        let alone = registry.admit(addr(1), t0);
        assert!(!registry.close(alone.id), "once per crowd");
    }

    #[test]
    fn capacity_leaves_descriptors_free() {
        let cap = capacity();
        assert!((1..=MAX_CONNECTIONS).contains(&cap), "{cap}");
    }
}
