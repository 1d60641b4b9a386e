//! The one test harness, shared by every test binary and the benchmarks: runs the real drainit
//! (`Drainit::builder()`) around the demo app or any command, and observes it from outside, as a
//! user would: signals, HTTP probes, its JSON log events and the app's stdout. The end-to-end
//! suites add a real HAProxy, an open-loop load and a network namespace per replica.
#![allow(dead_code, unused_imports)] // each test binary uses its own part of the harness

pub mod binaries;
pub mod checker;
pub mod clock;
pub mod drainit;
pub mod haproxy;
pub mod hostile;
pub mod http;
pub mod lines;
pub mod load;
pub mod logs;
pub mod netns;
pub mod process;
pub mod procfs;
pub mod refused;
pub mod scraped;

pub use binaries::{demo_app_bin, drainit_bin};
pub use checker::Checker;
pub use clock::{Clock, opt_ms, poll_until, time_until};
pub use drainit::{App, Builder, Drainit, START_TIMEOUT, checker, command, demo, unique_control};
pub use haproxy::{Backend, Counters, Haproxy, HealthCheck, Retries, SLOW, Tuning, haproxy_bin};
pub use http::{
    body_of, free_ports, get_request, http_get, http_request, metric_value, try_request,
};
pub use lines::Line;
pub use load::{Arrivals, Load, LoadReport};
pub use logs::{event_of, evidence, is_event, is_phase, json};
pub use netns::{Netns, Replica, outputs_but};
pub use process::{Proc, wait_timeout};
pub use procfs::{children_of, first_child, is_running, parent_of, resident_kb};
pub use refused::{assert_refused, refused_with};
pub use scraped::ScrapedListener;
