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
use std::net::SocketAddr;
use std::time::Duration;

use nix::unistd::Pid;
use tokio::time::Instant;

use crate::tasks::{self, Blocking};
use crate::tcp::{self, Listener, TcpSampler, TreeSockets};

/// How often the app's file descriptors are read again while its known sockets all still listen,
/// to see a port it opened later.
const REDISCOVER: Duration = Duration::from_secs(30);

/// Which ports the check looks at, for logs and `/status`; `pod_wide`: a sidecar's, with no app
/// process to scope the ports to.
pub fn describe(given: &[u16], pod_wide: bool) -> String {
    match (given.is_empty(), pod_wide) {
        (false, _) => format!("--app-port {}", join(given.iter())),
        (true, false) => "the TCP ports the app's processes listen on".to_owned(),
        (true, true) => "every TCP port listening in the pod but drainit's own".to_owned(),
    }
}

/// What one look at the listening sockets found.
#[derive(Debug, Default)]
pub struct Sighting {
    /// The app's listening sockets, when its file descriptors were read this time.
    pub app: Option<TreeSockets>,
    /// Every listening socket of the namespace but drainit's own.
    pub listeners: Vec<Listener>,
}

type Look = Blocking<(Option<TcpSampler>, Sighting)>;

/// The check's memory between looks.
pub struct ListenCheck {
    /// `--app-port`: these must listen. Empty: the ports the app's processes listen on.
    given: Vec<u16>,
    /// `None`: a sidecar, with no app process to scope to: every listener of the network
    /// namespace but drainit's own is the app's.
    app: Option<Pid>,
    /// drainit's own probe port: never the app's.
    own_port: u16,
    /// drainit's probes listen on loopback only (a run on a workstation, a test): the app's
    /// loopback listeners are as reachable as drainit itself. In a pod the probes listen on
    /// every interface, and so must the app.
    local_only: bool,
    /// Opened on first use; inside the look while one runs.
    sampler: Option<TcpSampler>,
    /// A look that outlasted its timeout: the next check waits for it rather than start another.
    pending: Option<Look>,
    /// The app's listening sockets at the last reading of its file descriptors.
    app_sockets: Vec<Listener>,
    sockets_read: Option<Instant>,
    /// The ports the app served on when it was first ready: one that stops listening makes it
    /// unready. Later listeners (a helper on an ephemeral port) do not count.
    serving: Option<BTreeSet<u16>>,
}

impl ListenCheck {
    /// `probes` is where drainit's own probe server listens.
    pub fn new(given: Vec<u16>, app: Option<Pid>, probes: SocketAddr) -> Self {
        Self {
            given,
            app,
            own_port: probes.port(),
            local_only: probes.ip().is_loopback(),
            sampler: None,
            pending: None,
            app_sockets: Vec::new(),
            sockets_read: None,
            serving: None,
        }
    }

    /// One look, off the async thread: a dump or a /proc walk never holds up signals or probes.
    /// `Ok(detail)` when the app listens, `Err(why)` when it does not; `None` when the look took
    /// longer than `timeout` (it goes on, and the next check takes its result).
    pub async fn run(&mut self, timeout: Duration) -> Option<Result<String, String>> {
        let mut look = match self.pending.take() {
            Some(look) => look,
            None => self.start_look(),
        };
        match tokio::time::timeout(timeout, &mut look).await {
            Ok(Ok((sampler, sighting))) => {
                self.sampler = sampler;
                Some(self.judge(sighting, Instant::now()))
            }
            // A bug in the look: say so as a failed check rather than stop checking.
            Ok(Err(e)) => Some(Err(format!("cannot read the listening sockets: {e}"))),
            Err(_) => {
                self.pending = Some(look);
                None
            }
        }
    }

    fn start_look(&mut self) -> Look {
        let read_app_sockets = self.given.is_empty();
        let known = self.app_sockets.clone();
        let due = self
            .sockets_read
            .is_none_or(|read| read.elapsed() >= REDISCOVER);
        let (app, own_port, sampler) = (self.app, self.own_port, self.sampler.take());
        tasks::spawn_blocking(move || {
            let mut sampler = sampler.or_else(|| TcpSampler::new().ok());
            let mut listeners = tcp::listeners(sampler.as_mut());
            listeners.retain(|listener| listener.port != own_port);
            let still_listening = {
                let now: HashSet<&Listener> = listeners.iter().collect();
                !known.is_empty() && known.iter().all(|socket| now.contains(socket))
            };
            let app = (read_app_sockets && (due || !still_listening)).then(|| match app {
                Some(app) => tcp::listening_sockets_of_tree(app, &listeners),
                None => TreeSockets {
                    sockets: listeners.clone(),
                    unreadable: Vec::new(),
                },
            });
            (sampler, Sighting { app, listeners })
        })
    }

    /// The verdict on one sighting (pure, for the tests).
    pub fn judge(&mut self, sighting: Sighting, at: Instant) -> Result<String, String> {
        let in_pod: BTreeSet<u16> = sighting.listeners.iter().map(|l| l.port).collect();
        if !self.given.is_empty() {
            return self.judge_given(&in_pod);
        }
        let mut unreadable = Vec::new();
        if let Some(found) = sighting.app {
            self.app_sockets = found.sockets;
            unreadable = found.unreadable;
            self.sockets_read = Some(at);
        }
        let listening: BTreeSet<u16> = self.app_sockets.iter().map(|l| l.port).collect();
        if let Some(serving) = &self.serving {
            let closed: Vec<u16> = serving.difference(&listening).copied().collect();
            if !closed.is_empty() {
                return Err(format!(
                    "the app stopped listening on port {} (it served there)",
                    join(closed.iter())
                ));
            }
            return Ok(format!("listening on {}", join(listening.iter())));
        }
        let reachable: BTreeSet<u16> = self
            .app_sockets
            .iter()
            .filter(|l| !l.loopback || self.local_only)
            .map(|l| l.port)
            .collect();
        if reachable.is_empty() {
            return Err(not_listening_yet(&listening, &unreadable, &in_pod));
        }
        self.serving = Some(reachable);
        Ok(format!("listening on {}", join(listening.iter())))
    }

    /// `--app-port`: every given port listens, whoever in the pod holds it, on any address
    /// (a proxy in the pod may forward to a loopback port).
    fn judge_given(&mut self, in_pod: &BTreeSet<u16>) -> Result<String, String> {
        let given: BTreeSet<u16> = self.given.iter().copied().collect();
        let missing: Vec<u16> = given.difference(in_pod).copied().collect();
        if missing.is_empty() {
            self.serving = Some(given.clone());
            return Ok(format!("listening on {}", join(given.iter())));
        }
        let others: BTreeSet<u16> = in_pod.difference(&given).copied().collect();
        Err(format!(
            "nothing listens on --app-port {} {}; listening in the pod: {}",
            join(missing.iter()),
            if self.serving.is_some() {
                "any more"
            } else {
                "yet"
            },
            join_or_none(&others),
        ))
    }
}

/// Why an app with no reachable listener is not ready, and what to do about it.
fn not_listening_yet(
    loopback: &BTreeSet<u16>,
    unreadable: &[i32],
    in_pod: &BTreeSet<u16>,
) -> String {
    if !loopback.is_empty() {
        let ports = join(loopback.iter());
        return format!(
            "the app listens only on loopback (127.0.0.1 or ::1) port {ports}: nothing outside the pod can reach it; bind it to 0.0.0.0 or [::], or if a proxy in the pod forwards to it, give --app-port {ports}"
        );
    }
    if !unreadable.is_empty() {
        let pids: Vec<String> = unreadable.iter().map(i32::to_string).collect();
        return format!(
            "cannot read the file descriptors of the app's process {} (another user's: an entrypoint that drops privileges), so its sockets are unknown; give --app-port, or the container CAP_SYS_PTRACE",
            pids.join(",")
        );
    }
    let mut why =
        "the app listens on no TCP port yet (a worker that serves no TCP wants --ready-tcp none)"
            .to_owned();
    if !in_pod.is_empty() {
        why += &format!(
            "; listening in the pod, not by the app's processes: {} (if one is the app's, give --app-port)",
            join_or_none(in_pod)
        );
    }
    why
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

    /// As in a pod: the probes listen on every interface.
    fn probes() -> SocketAddr {
        SocketAddr::from(([0; 16], OWN))
    }

    fn check(given: &[u16]) -> ListenCheck {
        ListenCheck::new(given.to_vec(), Some(Pid::from_raw(1)), probes())
    }

    fn listener(port: u16, loopback: bool) -> Listener {
        Listener {
            port,
            inode: u32::from(port) + 1000,
            loopback,
        }
    }

    /// The pod's listening ports (drainit's own left out, as a look does), and the app's when
    /// its file descriptors were read.
    fn seen(pod: &[u16], app: Option<&[u16]>) -> Sighting {
        let sockets = |ports: &[u16]| ports.iter().map(|&p| listener(p, false)).collect();
        Sighting {
            app: app.map(|ports| TreeSockets {
                sockets: sockets(ports),
                unreadable: Vec::new(),
            }),
            listeners: sockets(pod),
        }
    }

    #[test]
    fn not_ready_until_the_app_listens_and_says_what_fits_a_worker() {
        let mut check = check(&[]);
        let now = Instant::now();
        let why = check.judge(seen(&[], Some(&[])), now).unwrap_err();
        assert_eq!(
            why,
            "the app listens on no TCP port yet (a worker that serves no TCP wants --ready-tcp none)"
        );
        assert_eq!(
            check.judge(seen(&[8080], Some(&[8080])), now),
            Ok("listening on 8080".to_owned())
        );
    }

    #[test]
    fn a_listener_of_someone_else_is_named_not_taken() {
        let mut check = check(&[]);
        let why = check
            .judge(seen(&[9090], Some(&[])), Instant::now())
            .unwrap_err();
        assert!(why.contains("not by the app's processes: 9090"), "{why}");
        assert!(why.contains("--ready-tcp none"), "{why}");
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
    fn a_serving_port_that_stops_listening_makes_the_app_unready_until_it_listens_again() {
        let mut check = check(&[]);
        let now = Instant::now();
        assert!(
            check
                .judge(seen(&[8080, 8443], Some(&[8080, 8443])), now)
                .is_ok()
        );
        let why = check.judge(seen(&[8443], Some(&[8443])), now).unwrap_err();
        assert_eq!(
            why,
            "the app stopped listening on port 8080 (it served there)"
        );
        assert!(
            check
                .judge(seen(&[8080, 8443], Some(&[8080, 8443])), now)
                .is_ok()
        );
    }

    #[test]
    fn a_helper_listener_that_comes_and_goes_later_does_not_matter() {
        // A headless browser, a kernel, an OAuth callback: ephemeral ports the app opens once
        // it serves.
        let mut check = check(&[]);
        let now = Instant::now();
        assert!(check.judge(seen(&[8080], Some(&[8080])), now).is_ok());
        assert!(
            check
                .judge(seen(&[8080, 41234], Some(&[8080, 41234])), now)
                .is_ok()
        );
        assert_eq!(
            check.judge(seen(&[8080], Some(&[8080])), now),
            Ok("listening on 8080".to_owned())
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
    fn a_loopback_only_app_is_not_ready_unless_its_port_is_given() {
        let mut check = check(&[]);
        let sighting = || Sighting {
            app: Some(TreeSockets {
                sockets: vec![listener(5000, true)],
                unreadable: Vec::new(),
            }),
            listeners: vec![listener(5000, true)],
        };
        let why = check.judge(sighting(), Instant::now()).unwrap_err();
        assert!(why.contains("listens only on loopback"), "{why}");
        assert!(why.ends_with("give --app-port 5000"), "{why}");
        // A proxy in the pod forwards to it: the user says so.
        let mut given = ListenCheck::new(vec![5000], Some(Pid::from_raw(1)), probes());
        assert!(given.judge(sighting(), Instant::now()).is_ok());
        // drainit's own probes on loopback: a workstation, where loopback is all there is.
        let local = SocketAddr::from(([127, 0, 0, 1], OWN));
        let mut local = ListenCheck::new(Vec::new(), Some(Pid::from_raw(1)), local);
        assert!(local.judge(sighting(), Instant::now()).is_ok());
    }

    #[test]
    fn sockets_drainit_may_not_read_are_explained() {
        let mut check = check(&[]);
        let sighting = Sighting {
            app: Some(TreeSockets {
                sockets: Vec::new(),
                unreadable: vec![42],
            }),
            listeners: vec![listener(8080, false)],
        };
        let why = check.judge(sighting, Instant::now()).unwrap_err();
        assert!(why.contains("process 42 (another user's"), "{why}");
        assert!(why.contains("give --app-port"), "{why}");
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
            check.judge(seen(&[8080, 9000], None), now),
            Ok("listening on 8080,9000".to_owned())
        );
        let why = check.judge(seen(&[9000], None), now).unwrap_err();
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
        let mut check = ListenCheck::new(Vec::new(), Some(me), probes());
        let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
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
            verdict.as_ref().is_err_and(
                |why| why.contains("stopped listening") && why.contains(&port.to_string())
            ),
            "{verdict:?}"
        );
    }
}
