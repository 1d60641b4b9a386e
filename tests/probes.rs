//! The probe server over real TCP: what the kubelet and load balancers send, and what they must
//! never be able to do to drainit.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Drainit, http_get, http_request, time_until};
use nix::sys::signal::Signal;

fn request(drainit: &Drainit, raw: &str) -> (u16, String) {
    http_request(drainit.health, raw)
}

#[test]
fn get_head_http10_json_404_405_and_400() {
    let drainit = Drainit::demo(&[], &[]);
    let (code, body) = request(&drainit, "GET /ready HTTP/1.0\r\n\r\n");
    assert_eq!(code, 200);
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(body.ends_with("ready: ready\n"), "{body}");

    let (code, body) = request(
        &drainit,
        "HEAD /alive HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 200);
    assert!(
        body.ends_with("\r\n\r\n"),
        "HEAD must have no body: {body:?}"
    );

    let (code, body) = request(
        &drainit,
        "GET /ready HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 200);
    assert!(body.contains(r#"{"phase":"ready","ready":true}"#), "{body}");

    assert_eq!(request(&drainit, "GET /metricz HTTP/1.0\r\n\r\n").0, 404);
    let (code, body) = request(
        &drainit,
        "POST /ready HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(code, 405);
    assert!(
        body.to_ascii_lowercase().contains("allow: get, head"),
        "{body}"
    );
    assert_eq!(request(&drainit, "BLAH\r\n\r\n").0, 400);
}

#[test]
fn keep_alive_connections_see_the_flip() {
    let drainit = Drainit::demo(&["--drain-delay", "5s"], &[]);
    let mut conn = TcpStream::connect(drainit.health).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut ask = || {
        conn.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = conn.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned()
    };
    assert_eq!(ask(), "200");
    drainit.signal(Signal::SIGTERM);
    drainit.event("drain_started");
    assert_eq!(
        ask(),
        "503",
        "a kept-alive probe connection must see the drain too"
    );
    drainit.signal(Signal::SIGINT);
}

#[test]
fn idle_and_slow_clients_cannot_delay_the_drain() {
    let mut drainit = Drainit::demo(&["--drain-delay", "500ms"], &[]);
    // Connections that never finish their headers, and one that trickles bytes.
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(drainit.health).unwrap())
        .collect();
    let mut slow = TcpStream::connect(drainit.health).unwrap();
    slow.write_all(b"GET /ready HT").unwrap();

    let sigterm = drainit.signal_at(Signal::SIGTERM);
    let flip = time_until(Duration::from_secs(5), || drainit.get("/ready").0 == 503);
    println!("/ready flipped {flip:?} after SIGTERM, among 200 idle and 1 slow client");
    // Served in order despite the crowd: 503 once the drain started, before the stop signal.
    drainit.event("drain_started");
    assert_eq!(drainit.get("/ready").0, 503);
    assert_eq!(drainit.count_events("stop_signal_sent"), 0);
    let stop = drainit.app_line("demo-app: signal TERM");
    assert!(
        stop.at - sigterm < Duration::from_millis(1500),
        "stop came {:?} after SIGTERM",
        stop.at - sigterm
    );
    assert_eq!(drainit.exit_code(Duration::from_secs(5)), 0);
    drop(idle);
}

#[test]
fn probes_answer_fast() {
    let drainit = Drainit::demo(&[], &[]);
    let start = Instant::now();
    for _ in 0..200 {
        assert_eq!(drainit.get("/ready").0, 200);
    }
    let took = start.elapsed();
    println!("{:?} per probe", took / 200);
    // Generous bound (20 ms a probe) for a shared machine; the timing bar is the benchmark's.
    assert!(took < Duration::from_secs(4), "200 probes took {took:?}");
    drainit.signal(Signal::SIGINT);
}

#[test]
fn all_interfaces_means_ipv4_and_ipv6() {
    let drainit = Drainit::start(
        &["--health-listen", ":0", "--ready-tcp", "none"],
        &["sleep", "30"],
    );
    assert!(drainit.health.ip().is_unspecified() && drainit.health.is_ipv6());
    let port = drainit.health.port();
    let mut loopbacks = vec![IpAddr::from([127, 0, 0, 1])];
    if std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok() {
        loopbacks.push(IpAddr::from(Ipv6Addr::LOCALHOST));
    } else {
        println!("no IPv6 loopback here: IPv4 only");
    }
    for ip in loopbacks {
        assert_eq!(http_get(SocketAddr::new(ip, port), "/ready").0, 200, "{ip}");
    }
}
