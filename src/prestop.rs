//! `drainit prestop`: the preStop hook. Asks the running drainit to drain and returns once the
//! drain is over, so the kubelet's SIGTERM only comes after it. No shell, no `sleep`.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::UnixStream;
use tracing::{error, info};

use crate::control::{self, ControlAddr};
use crate::exit;

pub async fn run(addr: &ControlAddr, timeout: Option<Duration>) -> u8 {
    let started = Instant::now();
    let stream = match addr.connect() {
        Ok(stream) => stream,
        Err(e) => {
            error!(
                event = "prestop_no_drainit",
                "no drainit is listening on {addr}: {e} (is drainit this container's ENTRYPOINT, with the same --control / DRAINIT_CONTROL?)"
            );
            return exit::PRESTOP_UNREACHABLE;
        }
    };
    let exchange = request_drain(stream);
    let reply = match timeout {
        Some(limit) => match tokio::time::timeout(limit, exchange).await {
            Ok(reply) => reply,
            Err(_) => {
                error!(
                    event = "prestop_timed_out",
                    timeout_ms = limit.as_millis() as u64,
                    "gave up waiting for the drain (--timeout)"
                );
                return exit::PRESTOP_TIMEOUT;
            }
        },
        None => exchange.await,
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match reply.as_str() {
        control::REPLY_DRAINED => {
            info!(
                event = "prestop_drain_over",
                elapsed_ms, "drain over: the app may be stopped"
            );
            0
        }
        // drainit exits as soon as the app does, possibly before it could answer.
        control::REPLY_APP_EXITED | "" => {
            info!(
                event = "prestop_app_gone",
                elapsed_ms, "the app has already exited: nothing left to drain"
            );
            0
        }
        refused if refused.starts_with(control::REPLY_REFUSED) => {
            error!(
                event = "prestop_refused",
                "drainit at {addr} {refused} (run the hook as the container's user)"
            );
            exit::PRESTOP_REFUSED
        }
        other => {
            error!(
                event = "prestop_unexpected_answer",
                reply = other,
                "unexpected answer from drainit at {addr} (a different drainit version?)"
            );
            1
        }
    }
}

/// Sends the request; returns drainit's answer, or "" if the channel closed without one.
async fn request_drain(stream: UnixStream) -> String {
    let mut channel = control::lines(stream);
    if channel.send(control::DRAIN_REQUEST).await.is_err() {
        return String::new();
    }
    match channel.next().await {
        Some(Ok(line)) => line.trim().to_owned(),
        _ => String::new(),
    }
}
