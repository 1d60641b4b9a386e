//! The probe server: `/alive` and `/ready` for the kubelet and load balancers.
//!
//! Each answer is read from the lifecycle channel at request time. Connections are handled on
//! their own tasks with bounded header time and a bounded count, so a slow or hostile client can
//! neither exhaust drainit nor hold up the supervisor's signal handling and reaping.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use crate::exit::StartupError;
use crate::lifecycle::Phase;

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

/// Serves probes until the process exits.
pub async fn serve(listener: TcpListener, phase: watch::Receiver<Phase>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "too many probe connections, closing this one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let phase = phase.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&request, *phase.borrow());
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
        _ => return plain(StatusCode::NOT_FOUND, "not found: try /alive or /ready\n"),
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
