//! The kernel's view of the app's TCP traffic, for the traffic drain watcher.
//!
//! A drain can end early once clients have stopped coming, but drainit must not sit in the data
//! path to see that: a proxy would add latency and a failure mode to every request. The kernel
//! already counts everything: sock_diag dumps every socket of the pod's network namespace with
//! its `tcp_info` (bytes received), `/proc/net/snmp` counts accepted connections, and `/proc`
//! maps the app's listening sockets to its ports. Reading them needs no privileges and costs the
//! app nothing.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use netlink_packet_core::{
    DoneBuffer, ErrorBuffer, NLA_HEADER_SIZE, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NlasIterator, Parseable,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{
    AF_INET, AF_INET6, INET_DIAG_INFO, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY, TCP_SYN_RECV,
    TCP_TIME_WAIT,
};
use netlink_packet_sock_diag::inet::nlas::TcpInfo;
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseBuffer, InetResponseHeader, SocketId, StateFlags,
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};
use nix::unistd::Pid;

use crate::process_tree;

/// One TCP connection to a local port, as the kernel's sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub local_port: u16,
    /// The peer; an IPv4 peer of a dual-stack (`[::]`) socket is given as IPv4, not `::ffff:a.b.c.d`.
    pub remote: SocketAddr,
    /// 0 while the connection waits in the listener's accept queue (it has no file yet).
    pub inode: u32,
    /// The kernel's unique id for the socket, set before `accept()` too: what tells connections
    /// apart from one sample to the next.
    pub cookie: u64,
    /// tcp_info.bytes_received; None where the kernel's tcp_info could not be parsed. Some(0)
    /// for a handshake still in progress, which has no tcp_info yet but received nothing either.
    pub bytes_received: Option<u64>,
    /// tcp_info.tcpi_last_data_recv: how long ago the socket last received data (or, if it never
    /// did, was established), as the kernel reads it in jiffies (HZ 100 to 1000: up to 10 ms
    /// off). Read from the struct's fixed start, so every kernel since 2.6 reports it. None for a
    /// handshake still in progress or without tcp_info.
    pub last_data_recv: Option<Duration>,
}

/// One sock_diag dump: connections to the app's ports, and the cookies of the sockets to other
/// listening ports (what explains the namespace's other passive opens).
#[derive(Debug, Default)]
pub struct Dump {
    pub connections: Vec<Connection>,
    /// Every socket (TIME_WAIT included: a short connection lingers there) whose local port is
    /// one of the `others` asked for, past its handshake.
    pub others: Vec<u64>,
}

/// A sock_diag netlink socket for the network namespace drainit runs in (the pod's).
pub struct TcpSampler {
    socket: Socket,
    /// Reused across dumps: sampling runs up to 10 times a second. Never zeroed: each dump
    /// receives into its spare capacity, so only the pages the kernel fills become resident (at
    /// rest one of its eight).
    buffer: Vec<u8>,
    sequence: u32,
    /// False once this kernel's tcp_info proved shorter than the crate's struct: then asking
    /// for it only makes the kernel build attributes nobody can read.
    tcp_info: bool,
}

/// The kernel never puts more than ~32 KiB in one dump datagram (netlink caps its dump skbs at
/// `SKB_WITH_OVERHEAD(32768)`), and sizes them by the largest read it has seen: one buffer this
/// size takes every datagram whole, with the fewest `recv` calls.
const RECEIVE_BUFFER: usize = 32 * 1024;

/// All states but LISTEN, TIME_WAIT and CLOSE: listeners are not connections, and TIME_WAIT or
/// CLOSE sockets can no longer receive anything. Filtering in the request spares the kernel
/// from formatting them at all.
fn connection_states() -> StateFlags {
    StateFlags::all() - StateFlags::LISTEN - StateFlags::TIME_WAIT - StateFlags::CLOSE
}

impl TcpSampler {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            socket: open_socket()?,
            buffer: Vec::with_capacity(RECEIVE_BUFFER),
            sequence: 0,
            tcp_info: true,
        })
    }

    /// Every non-listening TCP socket (IPv4 and IPv6; all states except LISTEN, TIME_WAIT and
    /// CLOSE) whose local port is in `ports`.
    pub fn connections(&mut self, ports: &[u16]) -> io::Result<Vec<Connection>> {
        Ok(self.sockets(ports, &[])?.connections)
    }

    /// The connections to `ports` (as [`TcpSampler::connections`]) and, in the same dump, the
    /// sockets to the `others` ports.
    pub fn sockets(&mut self, ports: &[u16], others: &[u16]) -> io::Result<Dump> {
        let mut connections = Vec::new();
        let mut other_sockets = Vec::new();
        if ports.is_empty() && others.is_empty() {
            return Ok(Dump::default());
        }
        let states = if others.is_empty() {
            connection_states()
        } else {
            connection_states() | StateFlags::TIME_WAIT
        };
        let with_info = self.tcp_info;
        let extensions = if with_info {
            ExtensionFlags::INFO
        } else {
            ExtensionFlags::empty()
        };
        let mut info_unparseable = false;
        for family in [AF_INET, AF_INET6] {
            self.dump(
                family,
                states.clone(),
                extensions.clone(),
                |header, nlas| {
                    let local_port = header.socket_id.source_port;
                    let cookie = u64::from_ne_bytes(header.socket_id.cookie);
                    if others.contains(&local_port) {
                        // A request socket's accepted child gets a cookie of its own: counting
                        // both would explain one passive open twice.
                        if header.state != TCP_SYN_RECV {
                            other_sockets.push(cookie);
                        }
                        return;
                    }
                    if !ports.contains(&local_port) || header.state == TCP_TIME_WAIT {
                        return;
                    }
                    let info = if with_info { find_tcp_info(nlas) } else { None };
                    let bytes_received = if with_info {
                        match info {
                            Some(info) => bytes_received(info).or_else(|| {
                                info_unparseable = true;
                                None
                            }),
                            // A request socket (handshake not complete) has no tcp_info at all.
                            None if header.state == TCP_SYN_RECV => Some(0),
                            None => None,
                        }
                    } else {
                        None
                    };
                    connections.push(Connection {
                        local_port,
                        remote: SocketAddr::new(
                            header.socket_id.destination_address.to_canonical(),
                            header.socket_id.destination_port,
                        ),
                        inode: header.inode,
                        cookie,
                        bytes_received,
                        last_data_recv: info.and_then(last_data_recv),
                    });
                },
            )?;
        }
        if info_unparseable {
            self.tcp_info = false;
        }
        Ok(Dump {
            connections,
            others: other_sockets,
        })
    }

    /// Every listening TCP socket, IPv4 and IPv6.
    pub fn listeners(&mut self) -> io::Result<Vec<Listener>> {
        let mut listeners = Vec::new();
        for family in [AF_INET, AF_INET6] {
            self.dump(
                family,
                StateFlags::LISTEN,
                ExtensionFlags::empty(),
                |header, _| {
                    listeners.push(Listener {
                        port: header.socket_id.source_port,
                        inode: header.inode,
                        loopback: header.socket_id.source_address.to_canonical().is_loopback(),
                    })
                },
            )?;
        }
        Ok(listeners)
    }

    /// Whether [`Connection::bytes_received`] can be `Some` on this kernel: false once its
    /// tcp_info proved unparseable, after which only connection arrivals can be observed.
    pub fn reports_bytes_received(&self) -> bool {
        self.tcp_info
    }

    /// Runs one sock_diag dump of TCP sockets of `family` in `states`, calling `each` with every
    /// socket's header and raw attributes, until the kernel's NLMSG_DONE.
    fn dump(
        &mut self,
        family: u8,
        states: StateFlags,
        extensions: ExtensionFlags,
        each: impl FnMut(&InetResponseHeader, &[u8]),
    ) -> io::Result<()> {
        let result = self.dump_once(family, states, extensions, each);
        if result.is_err() {
            // A dump cut short keeps running in the kernel, and the next request on this
            // socket would get EBUSY until it is read to the end: a new socket drops it.
            if let Ok(socket) = open_socket() {
                self.socket = socket;
            }
        }
        result
    }

    fn dump_once(
        &mut self,
        family: u8,
        states: StateFlags,
        extensions: ExtensionFlags,
        mut each: impl FnMut(&InetResponseHeader, &[u8]),
    ) -> io::Result<()> {
        // A new sequence number per dump, so that no stray message is ever read as this dump's
        // answer.
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = sequence;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions,
                states,
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            })
            .into(),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;

        let header_len = size_of::<InetResponseBuffer>();
        loop {
            self.buffer.clear();
            // Fills the spare capacity and sets the length to what it holds (the datagram, or as
            // much of it as fits).
            let received = match self.socket.recv(&mut self.buffer, nix::libc::MSG_TRUNC) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if received > self.buffer.len() {
                return Err(invalid(format!(
                    "sock_diag datagram of {received} bytes truncated to {}",
                    self.buffer.len()
                )));
            }
            let mut data = &self.buffer[..];
            while !data.is_empty() {
                let message = NetlinkBuffer::new_checked(data).map_err(invalid)?;
                let length = message.length() as usize;
                let payload = message.payload();
                data = &data[length.next_multiple_of(4).min(data.len())..];
                if message.sequence_number() != sequence {
                    continue;
                }
                match message.message_type() {
                    SOCK_DIAG_BY_FAMILY => {
                        let socket = InetResponseHeader::parse(payload).map_err(invalid)?;
                        each(&socket, &payload[header_len..]);
                    }
                    NLMSG_DONE => {
                        let code = DoneBuffer::new_checked(payload).map_err(invalid)?.code();
                        return match code {
                            0.. => Ok(()),
                            _ => Err(io::Error::from_raw_os_error(-code)),
                        };
                    }
                    NLMSG_ERROR => {
                        let error = ErrorBuffer::new_checked(payload).map_err(invalid)?;
                        return Err(match error.code() {
                            Some(code) => io::Error::from_raw_os_error(-code.get()),
                            None => invalid("sock_diag answered a dump with an ACK"),
                        });
                    }
                    // NLMSG_NOOP, or anything newer: nothing to read in it.
                    _ => {}
                }
            }
        }
    }
}

fn open_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    Ok(socket)
}

/// The INET_DIAG_INFO attribute's value (the kernel's struct tcp_info), if present.
fn find_tcp_info(nlas: &[u8]) -> Option<&[u8]> {
    NlasIterator::new(nlas)
        .map_while(Result::ok)
        .find(|nla| nla.kind() == INET_DIAG_INFO)
        .map(|nla| {
            // value() would borrow the iterator's item; slice the underlying buffer instead.
            let length = nla.length() as usize;
            &nla.into_inner()[NLA_HEADER_SIZE..length]
        })
}

/// bytes_received out of a kernel's struct tcp_info; None when it is shorter than the crate's
/// struct (older kernels), which rich parsing cannot read.
fn bytes_received(tcp_info: &[u8]) -> Option<u64> {
    TcpInfo::parse(tcp_info)
        .ok()
        .map(|info| info.bytes_received)
}

/// Where tcpi_last_data_recv sits in struct tcp_info: after 8 one-byte fields and 11 u32s
/// (rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans, fackets, last_data_sent,
/// last_ack_sent), unchanged since Linux 2.6.
const LAST_DATA_RECV_AT: usize = 8 + 11 * 4;

/// tcpi_last_data_recv (ms) out of a kernel's struct tcp_info, of any length that holds it.
fn last_data_recv(tcp_info: &[u8]) -> Option<Duration> {
    let bytes = tcp_info.get(LAST_DATA_RECV_AT..LAST_DATA_RECV_AT + 4)?;
    let ms = u32::from_ne_bytes(bytes.try_into().ok()?);
    Some(Duration::from_millis(u64::from(ms)))
}

fn invalid(error: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

/// Cumulative passive opens (connections accepted by any listener) of this network namespace,
/// from /proc/net/snmp ("Tcp:" header/value lines, field PassiveOpens).
pub fn passive_opens() -> io::Result<u64> {
    let snmp = fs::read_to_string("/proc/net/snmp")?;
    parse_passive_opens(&snmp).ok_or_else(|| invalid("no Tcp: PassiveOpens in /proc/net/snmp"))
}

/// Parses that file's text (unit-testable).
pub fn parse_passive_opens(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|line| line.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let index = names
        .split_whitespace()
        .position(|name| name == "PassiveOpens")?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// A listening TCP socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Listener {
    pub port: u16,
    /// What ties it to a process's file descriptor (`socket:[inode]`).
    pub inode: u32,
    /// Bound to 127.0.0.1 or ::1 only: nothing outside the pod can connect to it.
    pub loopback: bool,
}

/// Every listening TCP socket of the namespace, IPv4 and IPv6: from sock_diag when there is a
/// sampler and it answers, else from /proc/net/tcp{,6} (sandboxes such as gVisor or qemu-user
/// have no sock_diag). Empty when neither can be read.
pub fn listeners(sampler: Option<&mut TcpSampler>) -> Vec<Listener> {
    sampler
        .and_then(|sampler| sampler.listeners().ok())
        .unwrap_or_else(|| listeners_from_proc().unwrap_or_default())
}

/// The listening sockets of /proc/net/tcp and /proc/net/tcp6. Costs more than a sock_diag dump
/// (the files list every socket, connections included), hence only a fallback.
pub fn listeners_from_proc() -> io::Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    let mut readable = false;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(table) = fs::read_to_string(file) {
            readable = true;
            listeners.extend(parse_proc_net_listeners(&table));
        }
    }
    if readable {
        Ok(listeners)
    } else {
        Err(invalid(
            "neither /proc/net/tcp nor /proc/net/tcp6 can be read",
        ))
    }
}

/// The LISTEN (state 0A) lines of a /proc/net/tcp table: "sl local rem st tx:rx tr:when retr
/// uid timeout inode ...", the local address as hex IP:PORT.
fn parse_proc_net_listeners(table: &str) -> Vec<Listener> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&LISTEN) {
                return None;
            }
            let (address, port) = fields.get(1)?.rsplit_once(':')?;
            Some(Listener {
                port: u16::from_str_radix(port, 16).ok()?,
                inode: fields.get(9)?.parse().ok()?,
                loopback: parse_proc_net_address(address)?
                    .to_canonical()
                    .is_loopback(),
            })
        })
        .collect()
}

/// A /proc/net/tcp address: the kernel prints each 32-bit word of the network-order address as
/// a native-endian number, in hex.
fn parse_proc_net_address(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<[u8; 4]>> = (0..hex.len())
        .step_by(8)
        .map(|i| {
            let word = u32::from_str_radix(hex.get(i..i + 8)?, 16).ok()?;
            Some(word.to_ne_bytes())
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// What reading the file descriptors of a process tree found.
#[derive(Debug, Default)]
pub struct TreeSockets {
    /// Its listening sockets, sorted.
    pub sockets: Vec<Listener>,
    /// Processes of the tree whose descriptors drainit may not read: another user's, without
    /// CAP_SYS_PTRACE (an entrypoint that drops privileges).
    pub unreadable: Vec<i32>,
}

/// The listening sockets that processes of the tree rooted at `root` (root and all its
/// descendants) hold: match the `socket:[inode]` links in /proc/<pid>/fd/* against `listeners`.
/// Stops reading as soon as every one of `listeners` is found. Processes that just exited are
/// skipped, never an error.
pub fn listening_sockets_of_tree(root: Pid, listeners: &[Listener]) -> TreeSockets {
    let mut by_inode: HashMap<u32, Listener> = listeners
        .iter()
        .filter(|listener| listener.inode != 0)
        .map(|listener| (listener.inode, *listener))
        .collect();
    let mut found = TreeSockets::default();
    for pid in process_tree::descendants_and_self(root.as_raw()) {
        if by_inode.is_empty() {
            break;
        }
        let fds = match fs::read_dir(format!("/proc/{pid}/fd")) {
            Ok(fds) => fds,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                found.unreadable.push(pid);
                continue;
            }
            Err(_) => continue,
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u32>().ok());
            if let Some(listener) = inode.and_then(|inode| by_inode.remove(&inode)) {
                found.sockets.push(listener);
            }
        }
    }
    found.sockets.sort_unstable_by_key(|l| (l.port, l.inode));
    found
}

/// The ports that processes of the tree rooted at `root` listen on (see
/// [`listening_sockets_of_tree`]). Sorted, deduplicated.
pub fn listening_ports_of_tree(root: Pid, listeners: &[Listener]) -> Vec<u16> {
    ports_of(&listening_sockets_of_tree(root, listeners).sockets)
}

/// The ports of `listeners`, sorted, deduplicated.
pub fn ports_of(listeners: &[Listener]) -> Vec<u16> {
    let mut ports: Vec<u16> = listeners.iter().map(|listener| listener.port).collect();
    // sort(), not sort_unstable(): the u16 sort the binary holds anyway (BTreeSet's collect).
    ports.sort();
    ports.dedup();
    ports
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::process::{Command, Stdio};
    use std::time::Instant;

    use super::*;

    /// This machine's /proc/net/snmp (kernel 6.18), pasted once.
    const SNMP: &str = "\
Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams InUnknownProtos InDiscards InDelivers OutRequests OutDiscards OutNoRoutes ReasmTimeout ReasmReqds ReasmOKs ReasmFails FragOKs FragFails FragCreates OutTransmits
Ip: 2 64 1139371 0 0 0 0 0 1139371 1137852 0 0 0 0 0 0 0 0 0 1137852
Icmp: InMsgs InErrors InCsumErrors InDestUnreachs InTimeExcds InParmProbs InSrcQuenchs InRedirects InEchos InEchoReps InTimestamps InTimestampReps InAddrMasks InAddrMaskReps OutMsgs OutErrors OutRateLimitGlobal OutRateLimitHost OutDestUnreachs OutTimeExcds OutParmProbs OutSrcQuenchs OutRedirects OutEchos OutEchoReps OutTimestamps OutTimestampReps OutAddrMasks OutAddrMaskReps
Icmp: 1 0 0 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
IcmpMsg: InType3
IcmpMsg: 1
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 136364 130927 5408 127193 0 1139308 1137805 2 0 69079 0
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 62 0 0 63 0 0 0 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 0 0 0 0 0
";

    #[test]
    fn parses_passive_opens_from_real_snmp() {
        assert_eq!(parse_passive_opens(SNMP), Some(130_927));
    }

    #[test]
    fn rejects_malformed_snmp() {
        assert_eq!(parse_passive_opens(""), None);
        // Header without its value line.
        assert_eq!(parse_passive_opens("Tcp: ActiveOpens PassiveOpens\n"), None);
        // No PassiveOpens field.
        assert_eq!(parse_passive_opens("Tcp: ActiveOpens\nTcp: 5\n"), None);
        // Value line too short.
        assert_eq!(
            parse_passive_opens("Tcp: ActiveOpens PassiveOpens\nTcp: 5\n"),
            None
        );
        // Not a number.
        assert_eq!(
            parse_passive_opens("Tcp: ActiveOpens PassiveOpens\nTcp: 5 x\n"),
            None
        );
        // Only the Udp section.
        assert_eq!(
            parse_passive_opens("Udp: InDatagrams PassiveOpens\nUdp: 1 2\n"),
            None
        );
    }

    /// A connected pair through `listener`, with `sent` bytes already read by the server side.
    fn connected(listener: &TcpListener, sent: usize) -> (TcpStream, TcpStream) {
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(&vec![7; sent]).unwrap();
        server.read_exact(&mut vec![0; sent]).unwrap();
        (client, server)
    }

    fn check_loopback(sampler: &mut TcpSampler, address: &str) {
        let listener = match TcpListener::bind(address) {
            Ok(listener) => listener,
            Err(e) if address.starts_with('[') => {
                println!("skipping {address}: {e}");
                return;
            }
            Err(e) => panic!("bind {address}: {e}"),
        };
        let port = listener.local_addr().unwrap().port();
        let listeners = sampler.listeners().unwrap();
        let listed = listeners.iter().find(|l| l.port == port);
        assert!(
            listed.is_some_and(|l| l.inode != 0 && l.loopback),
            "{address} port {port} not listed with an inode: {listeners:?}"
        );

        let before = passive_opens().unwrap();
        let (client, _server) = connected(&listener, 1000);
        assert!(passive_opens().unwrap() > before);

        let connections = sampler.connections(&[port]).unwrap();
        assert!(connections.iter().all(|c| c.local_port == port));
        let accepted = connections
            .iter()
            .find(|c| c.remote == client.local_addr().unwrap())
            .unwrap_or_else(|| panic!("accepted socket missing: {connections:?}"));
        assert_ne!(accepted.inode, 0);
        assert_ne!(accepted.cookie, 0, "every socket has a cookie");
        match accepted.bytes_received {
            Some(bytes) => {
                println!("{address}: rich tcp_info parsed, bytes_received = {bytes}");
                assert!(bytes >= 1000);
            }
            None => {
                println!("{address}: tcp_info unparseable, fallback without bytes_received");
                assert!(!sampler.reports_bytes_received());
            }
        }
        // Neither the listener nor the client's end (its local port is ephemeral) is a
        // connection to `port`.
        assert_eq!(connections.len(), 1, "{connections:?}");
    }

    #[test]
    fn sees_loopback_listeners_and_connections() {
        let mut sampler = TcpSampler::new().unwrap();
        check_loopback(&mut sampler, "127.0.0.1:0");
        check_loopback(&mut sampler, "[::1]:0");
    }

    #[test]
    fn dual_stack_peer_is_reported_as_ipv4() {
        let Ok(listener) = TcpListener::bind("[::]:0") else {
            println!("skipping: no IPv6");
            return;
        };
        let port = listener.local_addr().unwrap().port();
        let Ok(mut client) = TcpStream::connect(("127.0.0.1", port)) else {
            println!("skipping: [::] is IPv6-only here");
            return;
        };
        let (_server, _) = listener.accept().unwrap();
        client.write_all(b"x").unwrap();
        let connections = TcpSampler::new().unwrap().connections(&[port]).unwrap();
        assert!(
            connections
                .iter()
                .any(|c| c.remote == client.local_addr().unwrap()),
            "{connections:?}"
        );
    }

    #[test]
    fn the_age_of_the_last_inbound_data_is_reported_and_other_ports_are_listed_apart() {
        let app = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let (app_port, other_port) = (
            app.local_addr().unwrap().port(),
            other.local_addr().unwrap().port(),
        );
        let (_client, _server) = connected(&app, 10);
        // A short connection to the other port, closed by the server first: TIME_WAIT there.
        let (client, server) = connected(&other, 10);
        drop(server);
        let mut buf = [0; 1];
        let _ = (&client).read(&mut buf);
        drop(client);
        std::thread::sleep(Duration::from_millis(30));
        let mut sampler = TcpSampler::new().unwrap();
        let dump = sampler.sockets(&[app_port], &[other_port]).unwrap();
        assert_eq!(dump.connections.len(), 1, "{dump:?}");
        let age = dump.connections[0].last_data_recv.expect("tcp_info");
        assert!(
            age >= Duration::from_millis(20) && age < Duration::from_secs(5),
            "{age:?}"
        );
        assert_eq!(dump.others.len(), 1, "the TIME_WAIT socket: {dump:?}");
    }

    #[test]
    fn dump_without_tcp_info_reports_no_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (_client, _server) = connected(&listener, 10);
        let mut sampler = TcpSampler::new().unwrap();
        sampler.tcp_info = false;
        let connections = sampler.connections(&[port]).unwrap();
        assert_eq!(connections.len(), 1);
        assert_eq!(connections[0].bytes_received, None);
        assert_ne!(connections[0].inode, 0);
    }

    #[test]
    fn short_tcp_info_is_not_parsed() {
        // A real tcp_info from this kernel, then cut to Linux 4.1's size (it ends with
        // tcpi_bytes_received): shorter than the crate's struct (232 bytes, Linux 5.4's).
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (_client, _server) = connected(&listener, 100);
        let mut sampler = TcpSampler::new().unwrap();
        let mut info = None;
        for family in [AF_INET, AF_INET6] {
            sampler
                .dump(
                    family,
                    connection_states(),
                    ExtensionFlags::INFO,
                    |header, nlas| {
                        if header.socket_id.source_port == port {
                            info = find_tcp_info(nlas).map(<[u8]>::to_vec);
                        }
                    },
                )
                .unwrap();
        }
        let info = info.expect("tcp_info attribute");
        println!("this kernel's tcp_info: {} bytes", info.len());
        assert_eq!(bytes_received(&info), Some(100));
        assert_eq!(bytes_received(&info[..136]), None);
        assert_eq!(bytes_received(&[]), None);
        // The age of the last inbound data is read from the fixed start, on any kernel.
        let rich = TcpInfo::parse(&info).unwrap().last_data_recv;
        assert_eq!(
            last_data_recv(&info[..136]),
            Some(Duration::from_millis(u64::from(rich)))
        );
        assert_eq!(last_data_recv(&info[..LAST_DATA_RECV_AT + 3]), None);
    }

    /// A python3 child running `script`, and the port it prints first.
    fn python(script: &str) -> (std::process::Child, u16) {
        let mut child = Command::new("python3")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap();
        (child, port)
    }

    #[test]
    fn handshake_in_progress_has_received_nothing() {
        // With TCP_DEFER_ACCEPT a connection whose client sent no data stays a request socket
        // (SYN_RECV) on the server side: no inode, no tcp_info.
        let (mut child, port) = python(
            "import socket, time\n\
             l = socket.socket()\n\
             l.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)\n\
             l.bind(('127.0.0.1', 0))\n\
             l.listen()\n\
             c = socket.create_connection(l.getsockname())\n\
             print(l.getsockname()[1], flush=True)\n\
             time.sleep(60)",
        );
        let connections = TcpSampler::new().unwrap().connections(&[port]);
        child.kill().unwrap();
        child.wait().unwrap();
        let connections = connections.unwrap();
        assert_eq!(connections.len(), 1, "{connections:?}");
        assert_eq!(connections[0].inode, 0);
        assert_eq!(connections[0].bytes_received, Some(0));
    }

    #[test]
    fn empty_port_list_needs_no_dump() {
        let mut sampler = TcpSampler::new().unwrap();
        assert_eq!(sampler.connections(&[]).unwrap(), vec![]);
    }

    #[test]
    fn finds_listening_ports_of_own_tree() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut sampler = TcpSampler::new().unwrap();
        let me = Pid::from_raw(std::process::id() as i32);

        let ports = listening_ports_of_tree(me, &sampler.listeners().unwrap());
        assert!(ports.contains(&port), "{port} not in {ports:?}");
        assert!(ports.is_sorted());

        let (mut child, child_port) = python(
            "import socket, time\n\
             s = socket.socket()\n\
             s.bind(('127.0.0.1', 0))\n\
             s.listen()\n\
             print(s.getsockname()[1], flush=True)\n\
             time.sleep(60)",
        );
        let ports = listening_ports_of_tree(me, &sampler.listeners().unwrap());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(ports.contains(&child_port), "{child_port} not in {ports:?}");
        assert!(ports.contains(&port));
    }

    #[test]
    fn proc_net_tables_give_the_listeners() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4711 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0050 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 4712 1 0000000000000000 20 4 30 10 -1
   2: 00000000000000000000000000000000:22B8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4713 1 0000000000000000 100 0 0 10 0
garbage line
";
        let listener = |port, inode, loopback| Listener {
            port,
            inode,
            loopback,
        };
        assert_eq!(
            parse_proc_net_listeners(table),
            vec![listener(8080, 4711, false), listener(8888, 4713, false)]
        );
        let loopback = "  sl  local_address rem_address   st
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 00000000000000000000000001000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 0200000A:1F93 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1
";
        let loopbacks: Vec<bool> = parse_proc_net_listeners(loopback)
            .iter()
            .map(|l| l.loopback)
            .collect();
        assert_eq!(loopbacks, [true, true, true, false]);
    }

    #[test]
    fn proc_fallback_agrees_with_sock_diag() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut sampler = TcpSampler::new().unwrap();
        let from_diag = listeners(Some(&mut sampler));
        let from_proc = listeners_from_proc().unwrap();
        let ours = |list: &[Listener]| list.iter().copied().find(|l| l.port == port);
        assert!(
            ours(&from_diag).is_some_and(|l| l.loopback),
            "{port} not in {from_diag:?}"
        );
        assert_eq!(ours(&from_diag), ours(&from_proc));
        assert_eq!(ours(&listeners(None)), ours(&from_diag));
    }

    #[test]
    fn unknown_root_has_no_ports() {
        let listeners = TcpSampler::new().unwrap().listeners().unwrap();
        // Above the kernel's pid_max limit (2^22), so no such process.
        assert!(listening_ports_of_tree(Pid::from_raw(i32::MAX), &listeners).is_empty());
    }

    /// `cargo test --release --lib tcp::tests::measure -- --ignored --nocapture`. Both ends of a
    /// loopback connection are sockets of this namespace: N connections make 2N sockets, and a
    /// pod with 2N inbound connections costs about what N does here.
    #[test]
    #[ignore = "measurement: opens 2000 loopback connections"]
    fn measure_sampling_costs() {
        let mut sampler = TcpSampler::new().unwrap();
        let time = |sampler: &mut TcpSampler, port| {
            let mut times: Vec<_> = (0..50)
                .map(|_| {
                    let start = Instant::now();
                    let found = sampler.connections(&[port]).unwrap();
                    (start.elapsed(), found.len())
                })
                .collect();
            times.sort();
            let (min, median, max) = (times[0].0, times[25].0, times[49].0);
            format!(
                "{} found, min {min:?} median {median:?} max {max:?}",
                times[0].1
            )
        };
        let idle = TcpListener::bind("127.0.0.1:0").unwrap();
        let idle_port = idle.local_addr().unwrap().port();
        println!("connections(), none: {}", time(&mut sampler, idle_port));

        let mut held = Vec::new();
        let mut port = 0;
        for n in [1000, 2000] {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let address = listener.local_addr().unwrap();
            let acceptor = std::thread::spawn(move || {
                (0..n)
                    .map(|_| listener.accept().unwrap().0)
                    .collect::<Vec<_>>()
            });
            let clients: Vec<_> = (0..n)
                .map(|_| TcpStream::connect(address).unwrap())
                .collect();
            let servers = acceptor.join().unwrap();
            for client in &clients {
                (&*client).write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            }
            let sockets = 2 * n + held.len();
            println!(
                "connections(), {n} established on the port ({sockets} sockets in all): {}",
                time(&mut sampler, address.port())
            );
            held.extend(clients);
            held.extend(servers);
            port = address.port();
        }
        sampler.tcp_info = false;
        println!(
            "connections() without tcp_info, 2000 on the port: {}",
            time(&mut sampler, port)
        );

        let start = Instant::now();
        let listeners = sampler.listeners().unwrap();
        println!("listeners(): {:?}", start.elapsed());
        let start = Instant::now();
        passive_opens().unwrap();
        println!("passive_opens(): {:?}", start.elapsed());
        let start = Instant::now();
        listening_ports_of_tree(Pid::from_raw(std::process::id() as i32), &listeners);
        println!(
            "listening_ports_of_tree(self, {} sockets open): {:?}",
            held.len(),
            start.elapsed()
        );
    }
}
