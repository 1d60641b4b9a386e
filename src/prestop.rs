//! `drainit prestop`: the preStop hook. Asks the running drainit to drain and returns once the
//! drain is over, so the kubelet's SIGTERM only comes after it. No shell, no `sleep`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tracing::{error, info};

use crate::control::{self, ControlAddr};
use crate::exit;

pub async fn run(addr: &ControlAddr, timeout: Option<Duration>) -> u8 {
    let started = Instant::now();
    let exchange = request_drain(addr);
    let reply = match timeout {
        Some(limit) => match tokio::time::timeout(limit, exchange).await {
            Ok(reply) => reply,
            Err(_) => {
                error!(
                    timeout_ms = limit.as_millis() as u64,
                    "gave up waiting for the drain (--timeout)"
                );
                return exit::PRESTOP_TIMEOUT;
            }
        },
        None => exchange.await,
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match reply {
        Ok(line) if line == control::REPLY_DRAINED => {
            info!(elapsed_ms, "drain over: the app may be stopped");
            0
        }
        Ok(line) if line == control::REPLY_APP_EXITED || line.is_empty() => {
            info!(
                elapsed_ms,
                "the app has already exited: nothing left to drain"
            );
            0
        }
        Ok(line) => {
            error!(
                reply = line,
                "unexpected answer from drainit at {addr} (a different drainit version?)"
            );
            1
        }
        Err(e) => {
            error!(
                "no drainit is listening on {addr}: {e} (is drainit this container's ENTRYPOINT, with the same --control / DRAINIT_CONTROL?)"
            );
            exit::PRESTOP_UNREACHABLE
        }
    }
}

/// Sends the request; returns drainit's answer, or "" if it closed the channel without one (it
/// exits as soon as the app does).
async fn request_drain(addr: &ControlAddr) -> std::io::Result<String> {
    let mut stream = addr.connect()?;
    stream
        .write_all(format!("{}\n", control::DRAIN_REQUEST).as_bytes())
        .await?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).await?;
    Ok(line.trim().to_owned())
}
