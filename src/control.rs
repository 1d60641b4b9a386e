//! The control channel between `drainit prestop` (the preStop hook) and the running drainit.
//!
//! A Unix socket, abstract by default: the hook needs no shell, no writable filesystem, and only
//! processes in the pod's network namespace can reach it; it is never a TCP listener. The protocol
//! is one line each way: the hook sends `drain`, drainit answers once the drain is over.
//!
//! Only a caller with drainit's own uid, or root, may start the drain (its uid comes from the
//! kernel, SO_PEERCRED): any other user in the pod is refused, or it could stop the app.

use std::fmt;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr, UnixListener as StdUnixListener};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio::time::Instant;

use futures_util::{SinkExt, StreamExt};
use nix::unistd::Uid;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{Framed, LinesCodec};
use tracing::{debug, warn};

use crate::exit::StartupError;
use crate::lifecycle::{PhaseKind, State};
use crate::tasks;
use crate::throttle::Throttle;

/// The request line of `drainit prestop`.
pub const DRAIN_REQUEST: &str = "drain";
/// Answer once the drain is over and the app may be stopped.
pub const REPLY_DRAINED: &str = "drained";
/// Answer when the app is gone (it exited, or was stopped) before or during the drain.
pub const REPLY_APP_EXITED: &str = "app-exited";
/// Answer to a caller that may not drain this pod, followed by `: ` and the reason.
pub const REPLY_REFUSED: &str = "refused";

/// A peer that connects and says nothing must not hold a task forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longer than any valid line either way: a peer cannot make drainit buffer more.
const MAX_LINE_BYTES: usize = 256;
/// Repeated refusals and accept failures are logged at most this often.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// The kernel's limit on `sun_path`, less the terminating NUL.
const MAX_NAME_BYTES: usize = 107;

/// Where the control socket lives: `@name` (abstract) or a filesystem path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAddr {
    Abstract(String),
    Path(PathBuf),
}

impl FromStr for ControlAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr, name) = match text.strip_prefix('@') {
            Some(name) => (Self::Abstract(name.to_owned()), name),
            None => (Self::Path(PathBuf::from(text)), text),
        };
        if name.is_empty() {
            return Err(format!(
                "expected @name (abstract socket) or a socket file path, got '{text}'"
            ));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(format!(
                "socket names are limited to {MAX_NAME_BYTES} bytes, '{text}' is longer: pick a shorter one"
            ));
        }
        Ok(addr)
    }
}

impl fmt::Display for ControlAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Abstract(name) => write!(f, "@{name}"),
            Self::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

impl ControlAddr {
    fn socket_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Abstract(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            Self::Path(path) => SocketAddr::from_pathname(path),
        }
    }

    /// Binds the listener. A socket file left behind by a drainit that died is replaced; a live
    /// one (another drainit in this pod) is an error, so two wrappers never share a channel, and
    /// anything but a socket is never touched.
    pub fn bind(&self) -> Result<UnixListener, StartupError> {
        let bound =
            StdUnixListener::bind_addr(&self.socket_addr().map_err(|e| self.bind_error(e))?);
        let listener = match (bound, self) {
            (Err(e), Self::Path(path))
                if e.kind() == io::ErrorKind::AddrInUse && is_socket(path) && self.is_stale() =>
            {
                std::fs::remove_file(path).map_err(|e| self.bind_error(e))?;
                StdUnixListener::bind_addr(&self.socket_addr().map_err(|e| self.bind_error(e))?)
            }
            (result, _) => result,
        }
        .map_err(|e| self.bind_error(e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| self.bind_error(e))?;
        UnixListener::from_std(listener).map_err(|e| self.bind_error(e))
    }

    /// Removes the socket file (not an abstract name, which goes with the process).
    pub fn remove_socket_file(&self) {
        if let Self::Path(path) = self
            && is_socket(path)
        {
            let _ = std::fs::remove_file(path);
        }
    }

    fn is_stale(&self) -> bool {
        matches!(self.connect_std(), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    }

    fn connect_std(&self) -> io::Result<std::os::unix::net::UnixStream> {
        std::os::unix::net::UnixStream::connect_addr(&self.socket_addr()?)
    }

    /// Connects as a client (`drainit prestop`).
    pub fn connect(&self) -> io::Result<UnixStream> {
        let stream = self.connect_std()?;
        stream.set_nonblocking(true)?;
        UnixStream::from_std(stream)
    }

    fn bind_error(&self, error: io::Error) -> StartupError {
        let fix = if matches!(self, Self::Path(path) if path.exists() && !is_socket(path)) {
            "a file that is not a socket is in the way: pick another --control path"
        } else if error.kind() == io::ErrorKind::AddrInUse {
            "another drainit already runs in this pod: give each one its own --control"
        } else {
            "pick another --control (an @name needs no filesystem)"
        };
        StartupError::setup(format!(
            "cannot listen on control socket {self}: {error} ({fix})"
        ))
    }
}

fn is_socket(path: &std::path::Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Answers `drainit prestop` connections: each one asks for the drain and is answered when it is
/// over. Runs until the process exits.
pub async fn serve(listener: UnixListener, drain: mpsc::Sender<()>, state: watch::Receiver<State>) {
    let drainit_uid = Uid::effective();
    let mut refusals = Throttle::new(WARN_INTERVAL);
    let mut accept_failures = Throttle::new(WARN_INTERVAL);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match caller_may_drain(&stream, drainit_uid) {
                Ok(()) => {
                    tasks::spawn(answer(stream, drain.clone(), state.clone()));
                }
                Err(refusal) => {
                    if let Some(held_back) = refusals.occurred(Instant::now()) {
                        warn!(
                            event = "drain_request_refused",
                            held_back, "drain request refused: {refusal}"
                        );
                    }
                    tasks::spawn(refuse(stream, refusal));
                }
            },
            Err(e) => {
                // Out of file descriptors, say: it fails again at once, and would flood the log.
                if let Some(held_back) = accept_failures.occurred(Instant::now()) {
                    warn!(event = "control_accept_failed", error = %e, held_back, "control socket accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Whether the caller runs as drainit's uid or as root; if not, why it is refused.
fn caller_may_drain(stream: &UnixStream, drainit_uid: Uid) -> Result<(), String> {
    let caller = stream
        .peer_cred()
        .map_err(|e| format!("cannot tell the caller's uid ({e})"))?;
    let uid = Uid::from_raw(caller.uid());
    if uid.is_root() || uid == drainit_uid {
        return Ok(());
    }
    let pid = caller
        .pid()
        .map_or_else(String::new, |pid| format!(" (pid {pid})"));
    Err(format!(
        "uid {uid}{pid} may not drain this pod: only drainit's uid ({drainit_uid}) or root may"
    ))
}

/// One line each way, at most [`MAX_LINE_BYTES`] long.
pub fn lines(stream: UnixStream) -> Framed<UnixStream, LinesCodec> {
    Framed::new(stream, LinesCodec::new_with_max_length(MAX_LINE_BYTES))
}

/// The caller's request line, or what came instead.
async fn read_request(channel: &mut Framed<UnixStream, LinesCodec>) -> String {
    match tokio::time::timeout(REQUEST_TIMEOUT, channel.next()).await {
        Ok(Some(Ok(line))) => line,
        Ok(Some(Err(e))) => e.to_string(),
        Ok(None) => "nothing".to_owned(),
        Err(_) => format!("nothing within {REQUEST_TIMEOUT:?}"),
    }
}

async fn answer(stream: UnixStream, drain: mpsc::Sender<()>, mut state: watch::Receiver<State>) {
    let mut channel = lines(stream);
    let request = read_request(&mut channel).await;
    if request.trim() != DRAIN_REQUEST {
        debug!(event = "control_request_malformed", %request, "ignoring malformed control request");
        let _ = channel.send("error: expected 'drain'").await;
        return;
    }
    // The supervisor may already be gone (the app exited): the phase below says so.
    let _ = drain.send(()).await;
    let reply = match state.wait_for(State::drain_is_over).await {
        Ok(s) if s.kind() == PhaseKind::Exited => REPLY_APP_EXITED,
        Ok(_) => REPLY_DRAINED,
        Err(_) => REPLY_APP_EXITED,
    };
    let _ = channel.send(reply).await;
}

/// Tells a caller that may not drain why. Its request is read first: it sends before it reads,
/// and a socket closed under its feet would read as "drainit is gone".
async fn refuse(stream: UnixStream, refusal: String) {
    let mut channel = lines(stream);
    let _ = read_request(&mut channel).await;
    let _ = channel.send(format!("{REPLY_REFUSED}: {refusal}")).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "@drainit".parse(),
            Ok(ControlAddr::Abstract("drainit".into()))
        );
        assert_eq!(
            "/run/d.sock".parse(),
            Ok(ControlAddr::Path("/run/d.sock".into()))
        );
        assert!("@".parse::<ControlAddr>().is_err());
        assert!("".parse::<ControlAddr>().is_err());
        assert!(
            format!("@{}", "x".repeat(200))
                .parse::<ControlAddr>()
                .is_err()
        );
    }

    #[test]
    fn display_round_trips() {
        for text in ["@drainit", "/tmp/x.sock"] {
            assert_eq!(text.parse::<ControlAddr>().unwrap().to_string(), text);
        }
    }
}
