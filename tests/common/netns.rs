//! Network namespaces that give each replica its own TCP counters, sockets and ports, as a pod
//! has, and the replicas that run in them.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, Once};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::drainit::Drainit;
use super::haproxy::Backend;

/// Prefix of every namespace these tests create; the pid of the test process follows.
const NETNS_PREFIX: &str = "drainit-e2e-";
/// Prefix of the host end of every veth pair (interface names are at most 15 bytes).
const VETH_PREFIX: &str = "dre";
/// The private range replicas get addresses in: /30 blocks, host end .1, replica end .2.
const SUBNET: [u8; 2] = [10, 213];
const BLOCKS: u32 = 1 << 14;

/// A network namespace of its own for one replica, as a pod has: its own TCP counters
/// (`/proc/net/snmp`), sockets and ports. A veth pair links it to the test's namespace: the
/// replica is reachable at `ip` from there (HAProxy runs in the test's namespace). Deleted on
/// drop, panics included; drop the processes running inside first.
pub struct Netns {
    pub name: String,
    host_if: String,
    pub host_ip: Ipv4Addr,
    pub ip: Ipv4Addr,
}

impl Netns {
    /// Needs root (CI runs as root) and iproute2's `ip`.
    pub fn create() -> Self {
        static CLEANUP: Once = Once::new();
        CLEANUP.call_once(remove_stale_namespaces);
        // One allocation at a time in this process, so two replicas never pick the same block.
        static ALLOCATE: Mutex<u32> = Mutex::new(0);
        let mut next = ALLOCATE.lock().unwrap_or_else(|p| p.into_inner());
        let n = *next;
        *next += 1;
        let pid = std::process::id();
        let name = format!("{NETNS_PREFIX}{pid}-{n}");
        let host_if = format!("{VETH_PREFIX}{pid}h{n}");
        let peer_if = format!("{VETH_PREFIX}{pid}p{n}");
        assert!(host_if.len() <= 15, "interface name too long: {host_if}");
        // Left over by an earlier run that crashed with the same pid.
        let _ = ip_quiet(&["netns", "del", &name]);
        let _ = ip_quiet(&["link", "del", &host_if]);

        let block = free_block(pid);
        let base = u32::from(Ipv4Addr::new(SUBNET[0], SUBNET[1], 0, 0)) + block * 4;
        let host_ip = Ipv4Addr::from(base + 1);
        let ip = Ipv4Addr::from(base + 2);
        run_ip(&["netns", "add", &name]);
        // From here on, Drop cleans up whatever the next steps leave half done.
        let netns = Netns {
            name,
            host_if,
            host_ip,
            ip,
        };
        let name = netns.name.as_str();
        run_ip(&[
            "link",
            "add",
            &netns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
            "netns",
            name,
        ]);
        run_ip(&[
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &netns.host_if,
        ]);
        run_ip(&["link", "set", &netns.host_if, "up"]);
        run_ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{ip}/30"),
            "dev",
            &peer_if,
        ]);
        run_ip(&["-n", name, "link", "set", &peer_if, "up"]);
        run_ip(&["-n", name, "link", "set", "lo", "up"]);
        drop(next);
        netns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its end of the veth pair and so the pair; deleting the
        // host end as well covers a namespace kept alive by a process still inside.
        let _ = ip_quiet(&["netns", "del", &self.name]);
        let _ = ip_quiet(&["link", "del", &self.host_if]);
    }
}

/// One replica slot: a network namespace of its own, as a pod has, and what runs in it. A
/// replacement starts in the same namespace, at the same address (HAProxy's configuration is
/// static).
pub struct Replica {
    // Declared first: the processes inside go before their namespace.
    pub drainit: Drainit,
    pub server: String,
    pub netns: Netns,
}

impl Replica {
    /// `start` runs the replica's processes in a new namespace.
    pub fn start(server: &str, start: impl FnOnce(&Netns) -> Drainit) -> Self {
        let netns = Netns::create();
        Replica {
            drainit: start(&netns),
            server: server.to_owned(),
            netns,
        }
    }

    /// One replica per server name, each in a new namespace.
    pub fn start_all(servers: &[&str], start: impl Fn(&str, &Netns) -> Drainit) -> Vec<Self> {
        servers
            .iter()
            .map(|server| Replica::start(server, |netns| start(server, netns)))
            .collect()
    }

    /// The HAProxy `server` lines of `replicas`.
    pub fn backends(replicas: &[Replica], app_port: u16, health_port: u16) -> Vec<Backend> {
        replicas
            .iter()
            .map(|r| r.backend(app_port, health_port))
            .collect()
    }

    /// Its HAProxy `server` line: the app's port, checks on `health_port`.
    pub fn backend(&self, app_port: u16, health_port: u16) -> Backend {
        Backend {
            name: self.server.clone(),
            app: SocketAddr::from((self.netns.ip, app_port)),
            health_port,
        }
    }
}

/// The output of every replica but the `skip`th, for failure messages.
pub fn outputs_but(replicas: &[Replica], skip: Option<usize>) -> String {
    replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .map(|(_, r)| {
            format!(
                "{} output:\n{}",
                r.drainit.proc.name,
                r.drainit.proc.output()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `ip` and panics with its output if it fails.
fn run_ip(args: &[&str]) {
    if let Err(e) = ip_quiet(args) {
        panic!("`ip {}` failed: {e}", args.join(" "));
    }
}

fn ip_quiet(args: &[&str]) -> Result<String, String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "cannot run `ip` ({e}): these tests need iproute2 (Debian: apt-get install \
                 iproute2) and root, to give each replica its own network namespace"
            )
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// A /30 block of 10.213.0.0/16 no interface of this namespace uses yet, searched from a point
/// that depends on the pid, so that test processes running at once start apart.
fn free_block(pid: u32) -> u32 {
    let listing = ip_quiet(&["-4", "-o", "addr", "show"]).unwrap_or_else(|e| panic!("{e}"));
    let used: BTreeSet<u32> = listing
        .split_whitespace()
        .filter_map(|word| word.split_once('/').map(|(addr, _)| addr))
        .filter_map(|addr| addr.parse::<Ipv4Addr>().ok())
        .filter(|addr| addr.octets()[..2] == SUBNET)
        .map(|addr| (u32::from(addr) & 0xffff) / 4)
        .collect();
    let start = (pid % 1024) * 16;
    (0..BLOCKS)
        .map(|i| (start + i) % BLOCKS)
        .find(|block| *block != 0 && !used.contains(block))
        .expect("no free /30 block left in 10.213.0.0/16")
}

/// Namespaces and veths of test processes that no longer run (a run that crashed or was killed
/// before its Drop guards ran).
fn remove_stale_namespaces() {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    if let Ok(list) = ip_quiet(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or("");
            if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && !alive(pid) {
                // What that run left running inside (drainit, the app) goes first, or the
                // namespace would outlive its name.
                if let Ok(pids) = ip_quiet(&["netns", "pids", name]) {
                    for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
                let _ = ip_quiet(&["netns", "del", name]);
            }
        }
    }
    if let Ok(list) = ip_quiet(&["-o", "link", "show"]) {
        for line in list.lines() {
            // "12: dre1234h0@if11: <...>"
            let Some(name) = line.split_whitespace().nth(1) else {
                continue;
            };
            let name = name.trim_end_matches(':');
            let name = name.split('@').next().unwrap_or(name);
            let Some(rest) = name.strip_prefix(VETH_PREFIX) else {
                continue;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let tail = &rest[pid.len()..];
            if !pid.is_empty() && (tail.starts_with('h') || tail.starts_with('p')) && !alive(&pid) {
                let _ = ip_quiet(&["link", "del", name]);
            }
        }
    }
}
