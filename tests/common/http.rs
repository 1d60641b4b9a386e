//! The tests' one HTTP client: a request on a new connection, the whole answer read until the
//! server closes it. Plain std, so that a test sees the bytes drainit sends.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Sends `request` (raw) on a new connection and reads the answer within `timeout`: the status
/// code and the whole response (head and body).
pub fn try_request(
    addr: SocketAddr,
    request: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout.min(Duration::from_secs(2)))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("socket options: {e}"))?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    // A reset after the answer (the server closing with the request's tail unread) is no error.
    if let Err(e) = stream.read_to_string(&mut response)
        && response.is_empty()
    {
        return Err(format!("read: {e}"));
    }
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {response:?}"))?;
    Ok((code, response))
}

/// A raw request; returns the status code and the whole response; panics if there is none.
pub fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    try_request(addr, request, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e}"))
}

/// `GET path` with `agent` as User-Agent.
pub fn get_request(path: &str, agent: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: {agent}\r\nConnection: close\r\n\r\n")
}

/// `GET path`: the status code and the whole response.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, &get_request(path, "drainit-test"))
}

/// The body of a whole response.
pub fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// The value of the one series of `metrics` whose line starts with `series` followed by a space.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `N` distinct free ports on 127.0.0.1 (all bound at once, then released).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0"))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    ports.try_into().unwrap()
}
