//! The probe server: `/alive` and `/ready` for the kubelet and load balancers. It also accepts
//! the operators' `/status` and `/metrics` requests, on the same port, and hands them to
//! [`crate::admin`].
//!
//! Each answer is read from the lifecycle channel at request time. Connections are handled on
//! their own tasks with bounded header time and a bounded count, so a slow or hostile client can
//! neither exhaust drainit nor hold up the supervisor's signal handling and reaping.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::admin::{self, Page};
use crate::checkers::{CheckerId, CheckerKind};
use crate::cidr::Cidr;
use crate::drain::Observers;
use crate::exit::StartupError;
use crate::lifecycle::{PhaseKind, State};
use crate::metrics::Metrics;
use crate::tasks;
use crate::throttle::Throttle;

use self::connections::{Registry, SharedRegistry};
use self::drain_wait::Waiters;

pub mod connections;
pub mod drain_wait;

/// The most a request's start line and headers may take: a probe needs a few hundred bytes.
/// Larger requests get 431 and the connection is closed.
pub const MAX_HEADER_BYTES: usize = 4096;
/// hyper's smallest read buffer: a connection never holds more than this of a request.
const MAX_BUFFER_BYTES: usize = 8192;
/// One warning line per this long when accepting fails again and again (EMFILE).
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Binds the probe port before the app starts, so a taken port fails start-up cleanly. Once the
/// app runs, `announce` logs where probes go.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    let fail = |e: std::io::Error| {
        StartupError::setup(format!(
            "cannot listen for probes on {addr}: {e} (pick a free port with --health-listen and point the probes at it)"
        ))
    };
    match listen(addr) {
        // "All interfaces" is [::], which takes IPv4 too; a pod without IPv6 gets 0.0.0.0.
        Err(e) if addr == SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port())) && no_ipv6(&e) => {
            listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())))
        }
        bound => bound,
    }
    .map_err(fail)
}

/// A listening socket with a long accept queue (std's is 128): a burst of connections from
/// others must not make the kernel drop the kubelet's. The kernel caps it at
/// net.core.somaxconn (4096 by default since Linux 5.4).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    const BACKLOG: u32 = 4096;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

fn no_ipv6(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(nix::libc::EAFNOSUPPORT | nix::libc::EADDRNOTAVAIL)
    )
}

pub fn announce(listener: &TcpListener) {
    if let Ok(addr) = listener.local_addr() {
        info!(event = "probe_server_listening", %addr, "probe server listening");
    }
}

/// What the probe server needs besides the lifecycle: fixed at start-up, or shared state it reads.
#[derive(Debug)]
pub struct Context {
    /// Notified after each `/ready` check recorded: the start-up gate looks again at once.
    pub checker_recorded: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// `--lb-source`: only clients from these ranges can be load balancers; empty: anyone.
    pub lb_sources: Vec<Cidr>,
    /// `GET /drain/wait` clients waiting for the drain's end.
    pub waiters: Arc<Waiters>,
}

impl Context {
    /// Whether `checker` goes in the checker table: the kubelet always (it is tracked apart);
    /// others only from `--lb-source` ranges, when given.
    fn may_record(&self, checker: &CheckerId) -> bool {
        checker.is_kubelet()
            || self.lb_sources.is_empty()
            || self
                .lb_sources
                .iter()
                .any(|range| range.contains(checker.addr))
    }
}

/// Serves probes, and the admin endpoints, until the process exits.
pub async fn serve(
    listener: TcpListener,
    state: watch::Receiver<State>,
    observers: Observers,
    context: Context,
    admin: admin::Context,
) {
    let registry: SharedRegistry = Arc::new(std::sync::Mutex::new(Registry::new(
        connections::capacity(),
        connections::MAX_PER_ADDRESS,
        connections::MAX_SERVING,
    )));
    tasks::spawn(cut_late_connections(registry.clone()));
    let server = Arc::new(Server {
        state,
        observers,
        context,
        admin,
        registry,
    });
    let mut accept_failures = Throttle::new(ACCEPT_WARNING_EVERY);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_failed(&e, &mut accept_failures, &server.registry).await;
                continue;
            }
        };
        server.observers.own_accepts.fetch_add(1, Ordering::Relaxed);
        // On the dual-stack listener an IPv4 client shows as ::ffff:a.b.c.d.
        let peer = peer.ip().to_canonical();
        let admitted = connections::lock(&server.registry).admit(peer, Instant::now());
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            stream,
            peer,
            id: admitted.id,
            server: server.clone(),
        };
        tasks::spawn(connection.serve(admitted.cut));
    }
}

/// EMFILE and friends: says so once in a while, lets a held connection make way when out of
/// descriptors, and backs off instead of spinning.
async fn accept_failed(error: &std::io::Error, warnings: &mut Throttle, registry: &SharedRegistry) {
    if let Some(left_out) = warnings.occurred(Instant::now()) {
        warn!(event = "probe_accept_failed", error = %error, repeated = left_out, "probe server accept failed");
    }
    if matches!(
        error.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE)
    ) {
        connections::lock(registry).make_room();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// What every connection shares: one pointer per connection, so that an idle one stays small.
struct Server {
    state: watch::Receiver<State>,
    observers: Observers,
    context: Context,
    admin: admin::Context,
    registry: SharedRegistry,
}

/// Cuts connections that do not start serving in time, for as long as the server runs.
async fn cut_late_connections(registry: SharedRegistry) {
    let mut sweep = tokio::time::interval(connections::SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        sweep.tick().await;
        connections::lock(&registry).cut_late(Instant::now());
    }
}

/// One accepted probe connection and its place among the others.
struct Connection {
    stream: TcpStream,
    peer: IpAddr,
    id: u64,
    server: Arc<Server>,
}

impl Connection {
    /// Serves requests until the client closes, its headers time out, or it is `cut` to make
    /// room.
    async fn serve(self, cut: Arc<Notify>) {
        let (id, peer, server) = (self.id, self.peer, self.server.clone());
        tokio::select! {
            () = self.serve_once_it_speaks() => {}
            () = cut.notified() => debug!(event = "probe_connection_cut", %peer, "probe connection cut to make room for another"),
        }
        if connections::lock(&server.registry).close(id) {
            connections::give_back_memory();
        }
    }

    /// Until the client sends something it costs a socket and a small task: hyper's buffers
    /// (in the boxed rest) come with its first byte. Its time to speak is kept by the registry.
    async fn serve_once_it_speaks(self) {
        // A byte, not readiness: readiness can be reported before there is anything.
        if !matches!(self.stream.peek(&mut [0u8; 1]).await, Ok(1)) {
            return;
        }
        match drain_wait_head(&self.stream) {
            Some(head) => Box::pin(self.wait_for_drain_end(head)).await,
            None => Box::pin(self.serve_requests()).await,
        }
    }

    /// `GET /drain/wait`, served apart from hyper so that a waiter holds no buffers.
    async fn wait_for_drain_end(self, head: usize) {
        let server = self.server;
        connections::lock(&server.registry).park(self.id, Instant::now());
        let outcome = drain_wait::serve(
            self.stream,
            self.peer,
            head,
            server.state.clone(),
            server.context.waiters.clone(),
        )
        .await;
        server.context.metrics.drain_wait(outcome);
    }

    async fn serve_requests(self) {
        let timeout = self.room_to_serve().await;
        let (id, peer, server) = (self.id, self.peer, self.server.clone());
        let service = service_fn(move |request| {
            connections::lock(&server.registry).touch(id, Instant::now());
            // Copied out first: the watch channel's read lock is not held while answering.
            let current = *server.state.borrow();
            let response = handle(&request, peer, current, &server);
            async move { Ok::<_, Infallible>(response) }
        });
        let served = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(timeout)
            .max_header_size(MAX_HEADER_BYTES)
            .max_buf_size(MAX_BUFFER_BYTES)
            .serve_connection(TokioIo::new(self.stream), service)
            .await;
        if let Err(e) = served {
            debug!(event = "probe_connection_error", %peer, error = %e, "probe connection ended with an error");
        }
    }

    /// A place among the serving connections (see [`Registry::start_serving`]) and the header
    /// timeout that comes with it; a slow client waits for one, without buffers, until the
    /// registry cuts it.
    async fn room_to_serve(&self) -> Duration {
        loop {
            let complete = request_head_is_complete(&self.stream);
            let room = {
                let mut connections = connections::lock(&self.server.registry);
                let serving = connections.start_serving(self.id, Instant::now(), complete);
                serving.ok_or_else(|| connections.slot_freed())
            };
            match room {
                Ok(timeout) => return timeout,
                Err(slot_freed) => slot_freed.notified().await,
            }
        }
    }
}

/// The length of the request head if what the client has sent so far is a whole
/// `GET /drain/wait` request (peeked: nothing is consumed).
fn drain_wait_head(stream: &TcpStream) -> Option<usize> {
    let mut head = [0u8; MAX_HEADER_BYTES];
    let peeked = peek_head(stream, &mut head);
    drain_wait::request_head(&head[..peeked])
}

/// Whether what the client has sent so far holds a whole request head: a probe sends its
/// request in one go, a slow client (slowloris, endless headers) does not. Peeked, so hyper
/// still reads it all.
fn request_head_is_complete(stream: &TcpStream) -> bool {
    let mut head = [0u8; MAX_HEADER_BYTES];
    let peeked = peek_head(stream, &mut head);
    head[..peeked].windows(4).any(|w| w == b"\r\n\r\n")
}

/// Copies what the client has sent so far into `head`, leaving it in the socket; how much.
fn peek_head(stream: &TcpStream, head: &mut [u8]) -> usize {
    // SAFETY: recv writes at most head.len() bytes into `head`, which we own; MSG_PEEK leaves
    // them in the socket and MSG_DONTWAIT never blocks the thread.
    let peeked = unsafe {
        nix::libc::recv(
            stream.as_raw_fd(),
            head.as_mut_ptr().cast(),
            head.len(),
            nix::libc::MSG_PEEK | nix::libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(peeked).unwrap_or(0)
}

/// Answers one request: a read of an admin endpoint from [`admin`], anything else as a probe
/// (for `/ready`, recording who checked and what they were told: that is the `lb-probes`
/// watcher's evidence).
fn handle(
    request: &Request<Incoming>,
    peer: IpAddr,
    state: State,
    server: &Server,
) -> Response<Full<Bytes>> {
    let asked = Asked::from(request);
    let admin_page = asked
        .reads
        .then(|| admin::page(asked.path, state, &server.observers, &server.admin))
        .flatten();
    let response = match admin_page {
        Some(Page { content_type, body }) => with_body(StatusCode::OK, content_type, body),
        None => probe(
            request,
            &asked,
            peer,
            state,
            &server.observers,
            &server.context,
        ),
    };
    server
        .context
        .metrics
        .probe(asked.path, response.status().as_u16(), asked.checker_kind());
    response
}

/// What a request asks, read once.
struct Asked<'a> {
    path: &'a str,
    /// GET or HEAD.
    reads: bool,
    agent: &'a str,
}

impl<'a> From<&'a Request<Incoming>> for Asked<'a> {
    fn from(request: &'a Request<Incoming>) -> Self {
        Self {
            path: request.uri().path(),
            reads: request.method() == Method::GET || request.method() == Method::HEAD,
            agent: request
                .headers()
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        }
    }
}

impl Asked<'_> {
    /// For the probe metrics: who asked.
    fn checker_kind(&self) -> CheckerKind {
        CheckerKind::of(self.agent, matches!(self.path, "/ready" | "/alive"))
    }
}

/// `/alive` and `/ready` (and anything else: 404/405), with the start-up gate applied to the
/// kubelet and every `/ready` check recorded for the `lb-probes` watcher.
fn probe(
    request: &Request<Incoming>,
    asked: &Asked<'_>,
    peer: IpAddr,
    state: State,
    observers: &Observers,
    context: &Context,
) -> Response<Full<Bytes>> {
    let checker = CheckerId::new(peer, asked.agent);
    let now = Instant::now();
    let held = asked.path == "/ready" && checker.is_kubelet() && state.gate_holds();
    let response = if held {
        plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the load balancers (start-up gate)\n",
        )
    } else {
        respond(request, state.kind())
    };
    if asked.path == "/ready" && asked.reads && context.may_record(&checker) {
        let ready = response.status() == StatusCode::OK;
        observers
            .checkers()
            .record(checker, now, ready, state.drain_has_started());
        context.checker_recorded.notify_one();
    }
    response
}

/// The answer to one probe request, given the current phase.
pub fn respond(request: &Request<Incoming>, phase: PhaseKind) -> Response<Full<Bytes>> {
    let wants_json = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"));
    answer(request.method(), request.uri().path(), wants_json, phase)
}

fn answer(
    method: &Method,
    path: &str,
    wants_json: bool,
    phase: PhaseKind,
) -> Response<Full<Bytes>> {
    let (probe, healthy) = match path {
        "/alive" => ("alive", phase.is_alive()),
        "/ready" => ("ready", phase.is_ready()),
        drain_wait::PATH => {
            return plain(
                StatusCode::BAD_REQUEST,
                "GET /drain/wait waits only for a whole request with no body, sent at once (as the kubelet's httpGet hook sends it)\n",
            );
        }
        _ => {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: try /alive, /ready, /status or /metrics\n",
            );
        }
    };
    if method != Method::GET && method != Method::HEAD {
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET or HEAD\n",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if wants_json {
        let body = serde_json::json!({ probe: healthy, "phase": phase.label() }).to_string() + "\n";
        return with_body(status, "application/json", body);
    }
    let verdict = if healthy {
        probe.to_owned()
    } else {
        format!("not {probe}")
    };
    plain(status, format!("{verdict}: {phase}\n"))
}

fn plain(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    with_body(status, "text/plain; charset=utf-8", body.into())
}

fn with_body(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(method: Method, path: &str, phase: PhaseKind) -> StatusCode {
        answer(&method, path, false, phase).status()
    }

    #[test]
    fn ready_only_while_ready_alive_until_exit() {
        let draining = PhaseKind::Draining;
        assert_eq!(
            status(Method::GET, "/ready", PhaseKind::Ready),
            StatusCode::OK
        );
        assert_eq!(
            status(Method::GET, "/ready", draining),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(Method::GET, "/ready", PhaseKind::Starting),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status(Method::HEAD, "/alive", draining), StatusCode::OK);
        assert_eq!(
            status(Method::GET, "/alive", PhaseKind::Stopping),
            StatusCode::OK
        );
        let exited = PhaseKind::Exited;
        assert_eq!(
            status(Method::GET, "/alive", exited),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn unknown_paths_and_methods() {
        assert_eq!(
            status(Method::GET, "/", PhaseKind::Ready),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(Method::POST, "/ready", PhaseKind::Ready),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            status(Method::DELETE, "/nope", PhaseKind::Ready),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn json_names_the_phase() {
        let response = answer(&Method::GET, "/ready", true, PhaseKind::Drained);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }
}
