//! The probe server: `/alive` and `/ready` for the kubelet and load balancers, `/status` for
//! operators.
//!
//! Each answer is read from the lifecycle channel at request time. Connections are handled on
//! their own tasks with bounded header time and a bounded count, so a slow or hostile client can
//! neither exhaust drainit nor hold up the supervisor's signal handling and reaping.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use crate::drain::lb_probes::CheckerId;
use crate::drain::{DrainPolicy, Observers, traffic};
use crate::exit::StartupError;
use crate::lifecycle::{Phase, State};

/// Probes send a few header lines; anything slower is not a probe.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Far above what the kubelet and a few load balancers need, far below the fd limit.
const MAX_CONNECTIONS: usize = 512;

/// Binds the probe port before the app starts, so a taken port fails start-up cleanly. Once the
/// app runs, `announce` logs where probes go.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    let fail = |e: std::io::Error| {
        StartupError::setup(format!(
            "cannot listen for probes on {addr}: {e} (pick a free port with --health-listen and point the probes at it)"
        ))
    };
    let listener = std::net::TcpListener::bind(addr).map_err(fail)?;
    listener.set_nonblocking(true).map_err(fail)?;
    TcpListener::from_std(listener).map_err(fail)
}

pub fn announce(listener: &TcpListener) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "probe server listening");
    }
}

/// What `/status` shows besides the lifecycle: fixed at start-up.
#[derive(Debug, Clone)]
pub struct StatusContext {
    pub started: Instant,
    pub app_pid: i32,
    pub drain: DrainPolicy,
}

/// Serves probes until the process exits.
pub async fn serve(
    listener: TcpListener,
    state: watch::Receiver<State>,
    observers: Observers,
    context: StatusContext,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let context = Arc::new(context);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "probe server accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        observers.own_accepts.fetch_add(1, Ordering::Relaxed);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many probe connections, closing this one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (state, observers, context) = (state.clone(), observers.clone(), context.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = handle(&request, peer.ip(), *state.borrow(), &observers, &context);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "probe connection ended with an error");
            }
            drop(slot);
        });
    }
}

/// Answers one request and, for `/ready`, records who checked and what they were told: that is
/// the `lb-probes` watcher's evidence.
fn handle(
    request: &Request<Incoming>,
    peer: IpAddr,
    state: State,
    observers: &Observers,
    context: &StatusContext,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path == "/status" && (request.method() == Method::GET || request.method() == Method::HEAD) {
        let body = status(state, observers, context).to_string() + "\n";
        return with_body(StatusCode::OK, "application/json", body);
    }
    let response = respond(request, state.phase);
    if path == "/ready" && response.status() != StatusCode::METHOD_NOT_ALLOWED {
        let agent = request
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let ready = response.status() == StatusCode::OK;
        let checker = CheckerId { addr: peer, agent };
        observers.checkers().record(
            checker,
            Instant::now(),
            ready,
            state.phase.drain_has_started(),
        );
    }
    response
}

/// `/status`: the live state of drainit and its watchers, as JSON.
fn status(state: State, observers: &Observers, context: &StatusContext) -> serde_json::Value {
    let now = Instant::now();
    let (policy, threshold, quiet) = match &context.drain {
        DrainPolicy::Fixed(delay) => (
            json!({ "fixed_delay_ms": delay.as_millis() as u64 }),
            None,
            None,
        ),
        DrainPolicy::Watched(watched) => {
            let watchers: Vec<String> = watched.watchers.iter().map(ToString::to_string).collect();
            let policy = json!({
                "watch": watchers,
                "min_ms": watched.min.as_millis() as u64,
                "max_ms": watched.max.as_millis() as u64,
            });
            let quiet = watched
                .watches_traffic()
                .then_some((watched.quiet_period, watched.max));
            (policy, Some(watched.lb_unhealthy_threshold), quiet)
        }
    };
    let threshold_or_default = threshold.unwrap_or(2);
    let checkers = observers.checkers();
    let traffic = traffic::lock(&observers.traffic);
    let origin = state.drain_started.unwrap_or(now);
    let quiet = quiet.map(|(period, max)| period.resolve(traffic.rate(origin), max));
    let mut traffic_view = traffic.status(now, quiet.as_ref().map(|(d, why)| (*d, why.as_str())));
    if let (Some((period, _)), Some(started)) = (&quiet, state.drain_started) {
        traffic_view["drained"] = json!(traffic.quiet_for(started) >= *period);
    }
    json!({
        "phase": state.phase.name(),
        "uptime_ms": context.started.elapsed().as_millis() as u64,
        "app_pid": context.app_pid,
        "drain_elapsed_ms": state.drain_started.map(|t| t.elapsed().as_millis() as u64),
        "drain_policy": policy,
        "traffic": traffic_view,
        "lb_probes": {
            "unhealthy_threshold": threshold,
            "drained": threshold.and(state.drain_started).map(|t| checkers.drained(now, t, threshold_or_default)),
            "checkers": checkers.status(now, state.drain_started, threshold_or_default),
        },
    })
}

/// The answer to one probe request, given the current phase.
pub fn respond(request: &Request<Incoming>, phase: Phase) -> Response<Full<Bytes>> {
    let wants_json = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"));
    answer(request.method(), request.uri().path(), wants_json, phase)
}

fn answer(method: &Method, path: &str, wants_json: bool, phase: Phase) -> Response<Full<Bytes>> {
    let (probe, healthy) = match path {
        "/alive" => ("alive", phase.is_alive()),
        "/ready" => ("ready", phase.is_ready()),
        _ => {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: try /alive, /ready or /status\n",
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
        let body = serde_json::json!({ probe: healthy, "phase": phase.name() }).to_string() + "\n";
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
    use crate::lifecycle::DrainTrigger;

    fn status(method: Method, path: &str, phase: Phase) -> StatusCode {
        answer(&method, path, false, phase).status()
    }

    #[test]
    fn ready_only_while_ready_alive_until_exit() {
        let draining = Phase::Draining {
            trigger: DrainTrigger::Sigterm,
        };
        assert_eq!(status(Method::GET, "/ready", Phase::Ready), StatusCode::OK);
        assert_eq!(
            status(Method::GET, "/ready", draining),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            status(Method::GET, "/ready", Phase::Starting),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status(Method::HEAD, "/alive", draining), StatusCode::OK);
        assert_eq!(
            status(Method::GET, "/alive", Phase::Stopping),
            StatusCode::OK
        );
        let exited = Phase::Exited { code: 0 };
        assert_eq!(
            status(Method::GET, "/alive", exited),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn unknown_paths_and_methods() {
        assert_eq!(
            status(Method::GET, "/", Phase::Ready),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(Method::POST, "/ready", Phase::Ready),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            status(Method::DELETE, "/nope", Phase::Ready),
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn json_names_the_phase() {
        let response = answer(&Method::GET, "/ready", true, Phase::Drained);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }
}
