//! The default app check (`--ready-tcp auto`): the app accepts TCP connections on its serving
//! ports.
//!
//! That the app was spawned says nothing of when it can serve: a small service listens a second
//! later, a JVM twenty, and a load balancer told "ready" before that gets its connections
//! refused. A socket in LISTEN state is what accepts connections (the kernel completes handshakes
//! into its queue whether or not the app has called `accept` yet), so the moment the app listens
//! is the first moment a request routed here is not refused.
//!
//! Cheap enough for every check: one sock_diag dump of the namespace's listening sockets (not of
//! its connections). The app's file descriptors are read only to learn which listeners are its
//! own: at first, when one of its sockets is gone, and every 30 s for new ones.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use nix::unistd::Pid;
use tokio::time::Instant;

use crate::tcp::{self, Listener, TcpSampler};

/// How often the app's file descriptors are read again while its known sockets all still listen,
/// to see a port it opened later.
const REDISCOVER: Duration = Duration::from_secs(30);

/// Which ports the check looks at, for logs and `/status`.
pub fn describe(given: &[u16]) -> String {
    if given.is_empty() {
        "the TCP ports the app's processes listen on".to_owned()
    } else {
        format!("--app-port {}", join(given.iter()))
    }
}

/// What one look at the listening sockets found.
#[derive(Debug, Default)]
pub struct Sighting {
    /// The app's listening sockets, when its file descriptors were read this time.
    pub app_sockets: Option<Vec<Listener>>,
    /// Every listening port of the namespace.
    pub ports: BTreeSet<u16>,
}

/// The check's memory between looks.
pub struct ListenCheck {
    /// `--app-port`: these must listen. Empty: the ports the app's processes listen on.
    given: Vec<u16>,
    app: Pid,
    /// drainit's own probe port: never the app's.
    own_port: u16,
    /// Opened on first use; `None` again after a look that timed out (a new one is cheap).
    sampler: Option<TcpSampler>,
    /// The app's listening sockets at the last reading of its file descriptors.
    app_sockets: Vec<Listener>,
    sockets_read: Option<Instant>,
    /// Every port the app has listened on: one that stops listening makes the app unready.
    served: BTreeSet<u16>,
}

impl ListenCheck {
    pub fn new(given: Vec<u16>, app: Pid, own_port: u16) -> Self {
        Self {
            given,
            app,
            own_port,
            sampler: None,
            app_sockets: Vec::new(),
            sockets_read: None,
            served: BTreeSet::new(),
        }
    }

    /// One look, off the async thread: a dump or a /proc walk never holds up signals or probes.
    /// `Ok(detail)` when the app listens, `Err(why)` when it does not; `None` when the look took
    /// longer than `timeout`.
    pub async fn run(&mut self, timeout: Duration) -> Option<Result<String, String>> {
        let read_app_sockets = self.given.is_empty();
        let known = self.app_sockets.clone();
        let due = self
            .sockets_read
            .is_none_or(|read| read.elapsed() >= REDISCOVER);
        let (app, sampler) = (self.app, self.sampler.take());
        let look = tokio::task::spawn_blocking(move || {
            let mut sampler = sampler.or_else(|| TcpSampler::new().ok());
            let listeners = tcp::listeners(sampler.as_mut());
            let still_listening = {
                let now: HashSet<&Listener> = listeners.iter().collect();
                !known.is_empty() && known.iter().all(|socket| now.contains(socket))
            };
            let app_sockets = (read_app_sockets && (due || !still_listening))
                .then(|| tcp::listening_sockets_of_tree(app, &listeners));
            let ports = listeners.iter().map(|(port, _)| *port).collect();
            (sampler, Sighting { app_sockets, ports })
        });
        let (sampler, sighting) = match tokio::time::timeout(timeout, look).await {
            Ok(Ok(done)) => done,
            // A bug in the look: say so as a failed check rather than stop checking.
            Ok(Err(e)) => return Some(Err(format!("cannot read the listening sockets: {e}"))),
            Err(_) => return None,
        };
        self.sampler = sampler;
        Some(self.judge(sighting, Instant::now()))
    }

    /// The verdict on one sighting (pure, for the tests).
    pub fn judge(&mut self, sighting: Sighting, at: Instant) -> Result<String, String> {
        if !self.given.is_empty() {
            return self.judge_given(&sighting.ports);
        }
        if let Some(mut sockets) = sighting.app_sockets {
            sockets.retain(|(port, _)| *port != self.own_port);
            self.app_sockets = sockets;
            self.sockets_read = Some(at);
        }
        let listening: BTreeSet<u16> = self.app_sockets.iter().map(|(port, _)| *port).collect();
        let closed: Vec<u16> = self.served.difference(&listening).copied().collect();
        if !closed.is_empty() {
            return Err(format!(
                "the app stopped listening on port {} (it listened before)",
                join(closed.iter())
            ));
        }
        if listening.is_empty() {
            let others = others(&sighting.ports, &listening, self.own_port);
            let mut why = "the app listens on no TCP port yet (a worker that serves no TCP wants --ready-tcp none)".to_owned();
            if !others.is_empty() {
                why += &format!(
                    "; listening in the pod, not by the app's processes: {} (if one is the app's, give --app-port)",
                    join_or_none(&others)
                );
            }
            return Err(why);
        }
        self.served.extend(&listening);
        Ok(format!("listening on {}", join(listening.iter())))
    }

    /// `--app-port`: every given port listens, whoever in the pod holds it.
    fn judge_given(&mut self, listening: &BTreeSet<u16>) -> Result<String, String> {
        let given: BTreeSet<u16> = self.given.iter().copied().collect();
        let missing: Vec<u16> = given.difference(listening).copied().collect();
        let closed = missing.iter().any(|port| self.served.contains(port));
        self.served.extend(given.intersection(listening));
        if missing.is_empty() {
            return Ok(format!("listening on {}", join(given.iter())));
        }
        Err(format!(
            "nothing listens on --app-port {} {}; listening in the pod: {}",
            join(missing.iter()),
            if closed { "any more" } else { "yet" },
            join_or_none(&others(listening, &given, self.own_port)),
        ))
    }
}

/// Listening ports of the pod that are neither the app's nor drainit's own.
fn others(listening: &BTreeSet<u16>, mine: &BTreeSet<u16>, own_port: u16) -> BTreeSet<u16> {
    listening
        .iter()
        .copied()
        .filter(|port| *port != own_port && !mine.contains(port))
        .collect()
}

fn join<'a>(ports: impl Iterator<Item = &'a u16>) -> String {
    ports.map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// Other listeners of the pod, for a message: a few are a hint, a node's worth (hostNetwork) is
/// noise.
fn join_or_none(ports: &BTreeSet<u16>) -> String {
    const SHOWN: usize = 8;
    match ports.len() {
        0 => "none".to_owned(),
        n if n <= SHOWN => join(ports.iter()),
        n => format!("{} and {} more", join(ports.iter().take(SHOWN)), n - SHOWN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: u16 = 8099;

    fn check(given: &[u16]) -> ListenCheck {
        ListenCheck::new(given.to_vec(), Pid::from_raw(1), OWN)
    }

    /// The namespace's listening ports, and the app's sockets when they were read.
    fn seen(ports: &[u16], app: Option<&[u16]>) -> Sighting {
        Sighting {
            app_sockets: app.map(|ports| ports.iter().map(|&p| (p, u32::from(p) + 1000)).collect()),
            ports: ports.iter().copied().collect(),
        }
    }

    #[test]
    fn not_ready_until_the_app_listens_and_says_what_fits_a_worker() {
        let mut check = check(&[]);
        let now = Instant::now();
        let why = check.judge(seen(&[OWN], Some(&[])), now).unwrap_err();
        assert!(
            why.contains("no TCP port yet") && why.contains("--ready-tcp none"),
            "{why}"
        );
        assert_eq!(
            check.judge(seen(&[OWN, 8080], Some(&[8080])), now),
            Ok("listening on 8080".to_owned())
        );
    }

    #[test]
    fn a_listener_of_someone_else_is_named_not_taken() {
        let mut check = check(&[]);
        let why = check
            .judge(seen(&[OWN, 9090], Some(&[])), Instant::now())
            .unwrap_err();
        assert!(why.contains("not by the app's processes: 9090"), "{why}");
        assert!(why.contains("--ready-tcp none"), "{why}");
        assert!(why.contains("--app-port"), "{why}");
    }

    #[test]
    fn a_node_full_of_listeners_is_summed_up() {
        let mut check = check(&[80]);
        let all: Vec<u16> = (1000..1100).collect();
        let why = check.judge(seen(&all, None), Instant::now()).unwrap_err();
        assert!(
            why.ends_with("1000,1001,1002,1003,1004,1005,1006,1007 and 92 more"),
            "{why}"
        );
    }

    #[test]
    fn drainits_own_port_is_never_the_apps() {
        let mut check = check(&[]);
        assert!(
            check
                .judge(seen(&[OWN], Some(&[OWN])), Instant::now())
                .is_err()
        );
    }

    #[test]
    fn a_port_that_stops_listening_makes_the_app_unready_until_it_listens_again() {
        let mut check = check(&[]);
        let now = Instant::now();
        assert!(
            check
                .judge(seen(&[8080, 8443], Some(&[8080, 8443])), now)
                .is_ok()
        );
        let why = check.judge(seen(&[8443], Some(&[8443])), now).unwrap_err();
        assert!(why.contains("stopped listening on port 8080"), "{why}");
        assert!(
            check
                .judge(seen(&[8080, 8443], Some(&[8080, 8443])), now)
                .is_ok()
        );
    }

    #[test]
    fn the_apps_sockets_are_remembered_between_readings() {
        let mut check = check(&[]);
        let now = Instant::now();
        assert!(check.judge(seen(&[8080], Some(&[8080])), now).is_ok());
        // A look that did not read the app's file descriptors keeps what the last one found.
        assert_eq!(
            check.judge(seen(&[8080], None), now),
            Ok("listening on 8080".to_owned())
        );
    }

    #[test]
    fn given_ports_must_all_listen() {
        let mut check = check(&[8080, 9000]);
        let now = Instant::now();
        let why = check.judge(seen(&[8080, 7000], None), now).unwrap_err();
        assert_eq!(
            why,
            "nothing listens on --app-port 9000 yet; listening in the pod: 7000"
        );
        assert_eq!(
            check.judge(seen(&[8080, 9000, OWN], None), now),
            Ok("listening on 8080,9000".to_owned())
        );
        let why = check.judge(seen(&[9000, OWN], None), now).unwrap_err();
        assert_eq!(
            why,
            "nothing listens on --app-port 8080 any more; listening in the pod: none"
        );
    }

    #[test]
    fn checks_the_real_listeners_of_this_process() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let me = Pid::from_raw(std::process::id() as i32);
        let mut check = ListenCheck::new(Vec::new(), me, OWN);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let verdict = runtime.block_on(check.run(Duration::from_secs(5))).unwrap();
        assert!(
            verdict
                .as_ref()
                .is_ok_and(|ports| ports.contains(&port.to_string())),
            "{verdict:?}"
        );
        drop(listener);
        let verdict = runtime.block_on(check.run(Duration::from_secs(5))).unwrap();
        assert!(
            verdict
                .as_ref()
                .is_err_and(|why| why.contains(&format!("stopped listening on port {port}"))),
            "{verdict:?}"
        );
    }
}
