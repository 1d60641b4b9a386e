//! Connection limits of the probe server: every client in the cluster can connect, so the number
//! of connections is bounded, per client address and in total, and a new connection is never
//! refused for lack of room: the least recently active connection of the address holding the
//! most is cut instead (HAProxy and Envoy shed the same way). The kubelet opens one short
//! connection per probe and sends its request at once, so it is always the newest and never the
//! one cut, however many idle or slow connections others hold.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Far above what the kubelet and a fleet of load-balancer nodes need; low enough that every
/// connection's buffers together stay within a few MB.
pub const MAX_CONNECTIONS: usize = 512;
/// One address (a node, a pod) holds at most this many: the others keep their room.
pub const MAX_PER_ADDRESS: usize = 64;
/// File descriptors kept free for drainit's own needs (signals, control channel, netlink).
const FD_RESERVE: usize = 64;
/// Probes send a few header lines at once; anything slower is not a probe.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// With over half the connections taken, a client that has not sent its request by this long
/// is cut: enough for a client across a slow network, far too short to hoard connections.
pub const HEADER_TIMEOUT_UNDER_PRESSURE: Duration = Duration::from_millis(500);

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
    MAX_CONNECTIONS.min(fds.saturating_sub(FD_RESERVE)).max(8)
}

/// Every open probe connection: its address, when it was last active, and how to cut it.
#[derive(Debug)]
pub struct Registry {
    capacity: usize,
    per_address: usize,
    next_id: u64,
    open: HashMap<u64, Open>,
    by_address: HashMap<IpAddr, usize>,
    /// Connections cut to make room, for the metrics and the log.
    pub cut: u64,
}

#[derive(Debug)]
struct Open {
    addr: IpAddr,
    last_active: Instant,
    cut: Arc<Notify>,
}

/// A connection's place in the registry; cut when [`Admitted::cut`] is notified.
#[derive(Debug)]
pub struct Admitted {
    pub id: u64,
    pub cut: Arc<Notify>,
    /// How long it may take to send a request's headers.
    pub header_timeout: Duration,
}

pub type SharedRegistry = Arc<Mutex<Registry>>;

pub fn lock(registry: &SharedRegistry) -> std::sync::MutexGuard<'_, Registry> {
    crate::sync::lock(registry)
}

impl Registry {
    pub fn new(capacity: usize, per_address: usize) -> Self {
        Self {
            capacity,
            per_address: per_address.min(capacity),
            next_id: 0,
            open: HashMap::new(),
            by_address: HashMap::new(),
            cut: 0,
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
            self.cut_stalest(Some(addr));
        }
        if self.open.len() >= self.capacity {
            let heaviest = self
                .by_address
                .iter()
                .max_by_key(|(_, count)| **count)
                .map(|(addr, _)| *addr);
            self.cut_stalest(heaviest);
        }
        let header_timeout = if self.open.len() * 2 >= self.capacity {
            HEADER_TIMEOUT_UNDER_PRESSURE
        } else {
            HEADER_TIMEOUT
        };
        let id = self.next_id;
        self.next_id += 1;
        let cut = Arc::new(Notify::new());
        self.open.insert(
            id,
            Open {
                addr,
                last_active: now,
                cut: cut.clone(),
            },
        );
        *self.by_address.entry(addr).or_default() += 1;
        Admitted {
            id,
            cut,
            header_timeout,
        }
    }

    /// A request arrived on connection `id`: it is in use, not hoarded.
    pub fn touch(&mut self, id: u64, now: Instant) {
        if let Some(open) = self.open.get_mut(&id) {
            open.last_active = now;
        }
    }

    /// Connection `id` closed (or was cut).
    pub fn remove(&mut self, id: u64) {
        let Some(open) = self.open.remove(&id) else {
            return;
        };
        if let Some(count) = self.by_address.get_mut(&open.addr) {
            *count -= 1;
            if *count == 0 {
                self.by_address.remove(&open.addr);
            }
        }
    }

    /// Cuts the least recently active connection (of `addr`, if given).
    fn cut_stalest(&mut self, addr: Option<IpAddr>) {
        let stalest = self
            .open
            .iter()
            .filter(|(_, open)| addr.is_none_or(|a| open.addr == a))
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

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_new_connection_always_gets_in_and_the_heaviest_address_pays() {
        let t0 = Instant::now();
        let mut registry = Registry::new(10, 8);
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
        let mut registry = Registry::new(100, 2);
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
    fn under_pressure_headers_must_come_sooner() {
        let t0 = Instant::now();
        let mut registry = Registry::new(4, 4);
        assert_eq!(registry.admit(addr(1), t0).header_timeout, HEADER_TIMEOUT);
        assert_eq!(registry.admit(addr(2), t0).header_timeout, HEADER_TIMEOUT);
        assert_eq!(
            registry.admit(addr(3), t0).header_timeout,
            HEADER_TIMEOUT_UNDER_PRESSURE
        );
    }

    #[test]
    fn closing_frees_the_address_and_the_room() {
        let t0 = Instant::now();
        let mut registry = Registry::new(4, 4);
        let a = registry.admit(addr(1), t0);
        registry.remove(a.id);
        registry.remove(a.id);
        assert!(registry.is_empty());
        assert!(registry.by_address.is_empty());
    }

    #[test]
    fn capacity_leaves_descriptors_free() {
        let cap = capacity();
        assert!((8..=MAX_CONNECTIONS).contains(&cap), "{cap}");
    }
}
