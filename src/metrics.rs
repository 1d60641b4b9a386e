//! Prometheus metrics for `GET /metrics`: the lifecycle, drains, the app's stop, probes, readiness
//! checks, signals, reaping and lost log lines.
//!
//! One [`Metrics`] is built at start-up and shared as `Arc<Metrics>`; every method takes `&self`,
//! is thread-safe and costs a few atomic operations (a labelled series takes a read lock, and a
//! write lock the first time it appears).
//!
//! **Format.** [`Metrics::render`] returns the Prometheus text exposition format 0.0.4, served as
//! [`CONTENT_TYPE`]. `prometheus-client` encodes OpenMetrics, which `promtool check metrics` and
//! other 0.0.4 parsers misread: a counter's `# HELP`/`# TYPE` lines name the family (`foo`) while
//! its samples are `foo_total`, and `info`/`stateset` are not 0.0.4 types. So the registry holds
//! only counters, gauges and histograms, build info is the usual `drainit_build_info` gauge, and
//! render() renames the counters' `# HELP`/`# TYPE` lines to their `_total` sample name. The text
//! still ends with `# EOF`, which 0.0.4 parsers (Prometheus, promtool) read as a comment.
//!
//! **Label values.** Each label comes from an enum's `label()` (`state` from
//! [`PhaseKind`], `reason` from [`EndReason`], `kind` and `result` from the app check's
//! [`CheckKind`] and [`Verdict`], `checker` from [`CheckerKind`]), and `signal` from the signals
//! [`crate::signals`] forwards, so no list here can drift from what drainit does. `path` depends on
//! what clients send: anything outside the served paths is recorded as `other`, which keeps the
//! number of series bounded.
//!
//! **The lifecycle state** is read at each scrape from where [`Metrics::read_phase_from`] points
//! (the lifecycle's channel), so it cannot disagree with `/ready`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode_registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::checkers::CheckerKind;
use crate::drain::EndReason;
use crate::lifecycle::PhaseKind;
use crate::probes::drain_wait;
use crate::readiness::{CheckKind, Verdict};
use crate::signals;

/// Content-Type for [`Metrics::render`]'s output: the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The paths the probe server answers; any other is counted as [`OTHER`].
const PROBE_PATHS: [&str; 4] = ["/alive", "/ready", "/status", "/metrics"];
/// Any path outside [`PROBE_PATHS`].
const OTHER: &str = "other";

/// Drains last the drain delay (typically 5-30 s) or up to the watched drain's cap.
const DRAIN_BUCKETS: [f64; 15] = [
    0.5, 1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0,
];
/// From an app that exits at once to one that takes its whole grace period.
const STOP_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0,
];
/// From a local TCP connect to a slow exec check.
const CHECK_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

type Label = Cow<'static, str>;

/// `name="value"`, the label set of every family with one label.
// One type, not a struct each: prometheus-client's code is built per label set type (9 KiB).
type OneLabel = [(&'static str, Label); 1];

fn one_label(name: &'static str, value: impl Into<Label>) -> OneLabel {
    [(name, value.into())]
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    path: Label,
    code: u16,
    checker: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    kind: Label,
    result: Label,
}

/// Where the current lifecycle phase is read, at each scrape.
struct PhaseSource(Box<dyn Fn() -> PhaseKind + Send + Sync>);

impl fmt::Debug for PhaseSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhaseSource({})", (self.0)().label())
    }
}

/// drainit's metrics and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Until set, the lifecycle is `starting`, as [`crate::lifecycle::Lifecycle`] begins.
    phase: OnceLock<PhaseSource>,
    /// Held while rendering, so that a scrape sees exactly one state at 1 even when two run at
    /// once.
    rendering: Mutex<()>,
    /// The `signal` label of each signal drainit forwards.
    signal_labels: HashMap<i32, Label>,
    lifecycle_state: Family<OneLabel, Gauge>,
    drain_duration: Histogram,
    drains: Family<OneLabel, Counter>,
    app_stop_duration: Histogram,
    budget_kills: Counter,
    signals_forwarded: Family<OneLabel, Counter>,
    zombies_reaped: Counter,
    probe_requests: Family<ProbeLabels, Counter>,
    app_checks: Family<CheckLabels, Counter>,
    app_check_duration: Family<OneLabel, Histogram>,
    late_arrivals: Counter,
    drain_waits: Family<OneLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric; build info is set here (version = env!("CARGO_PKG_VERSION")).
    /// The lifecycle shows as `starting` until [`Metrics::read_phase_from`] says where to read it.
    pub fn new() -> Self {
        let build_info = Family::<OneLabel, Gauge>::default();
        build_info
            .get_or_create(&one_label("version", env!("CARGO_PKG_VERSION")))
            .set(1);
        let mut metrics = Self {
            registry: Registry::default(),
            phase: OnceLock::new(),
            rendering: Mutex::new(()),
            signal_labels: signals::forwarded()
                .map(|signal| (signal, Cow::Owned(signals::name(signal))))
                .collect(),
            lifecycle_state: Family::default(),
            drain_duration: Histogram::new(DRAIN_BUCKETS),
            drains: Family::default(),
            app_stop_duration: Histogram::new(STOP_BUCKETS),
            budget_kills: Counter::default(),
            signals_forwarded: Family::default(),
            zombies_reaped: Counter::default(),
            probe_requests: Family::default(),
            app_checks: Family::default(),
            app_check_duration: Family::new_with_constructor(|| Histogram::new(CHECK_BUCKETS)),
            late_arrivals: Counter::default(),
            drain_waits: Family::default(),
        };
        for outcome in drain_wait::Outcome::ALL {
            metrics.drain_wait_series(outcome);
        }
        metrics.show_phase(PhaseKind::Starting);
        // Each reason has a series from start-up on, so `increase()` sees the first drain.
        for reason in EndReason::ALL {
            let _ = metrics.drains.get_or_create(&reason_labels(reason));
        }

        let registry = &mut metrics.registry;
        registry.register(
            "drainit_build_info",
            "drainit's version; always 1",
            build_info,
        );
        registry.register(
            "drainit_lifecycle_state",
            "The pod's lifecycle state: 1 for the current state, 0 for the others",
            metrics.lifecycle_state.clone(),
        );
        registry.register(
            "drainit_drain_duration_seconds",
            "How long drains took",
            metrics.drain_duration.clone(),
        );
        registry.register(
            "drainit_drains",
            "Drains ended, by what ended them",
            metrics.drains.clone(),
        );
        registry.register(
            "drainit_app_stop_duration_seconds",
            "Time from the stop signal to the app's exit",
            metrics.app_stop_duration.clone(),
        );
        registry.register(
            "drainit_budget_kills",
            "Times the shutdown budget ran out and the app's process group was SIGKILLed",
            metrics.budget_kills.clone(),
        );
        registry.register(
            "drainit_signals_forwarded",
            "Signals forwarded to the app",
            metrics.signals_forwarded.clone(),
        );
        registry.register(
            "drainit_zombies_reaped",
            "Orphaned processes reaped, the app not included",
            metrics.zombies_reaped.clone(),
        );
        registry.register(
            "drainit_probe_requests",
            "Probe requests answered, by path, status code and checker",
            metrics.probe_requests.clone(),
        );
        registry.register(
            "drainit_app_checks",
            "App readiness checks run, by kind and result",
            metrics.app_checks.clone(),
        );
        registry.register(
            "drainit_app_check_duration_seconds",
            "How long app readiness checks took",
            metrics.app_check_duration.clone(),
        );
        registry.register(
            "drainit_late_arrivals",
            "Requests that reached the app after its stop signal",
            metrics.late_arrivals.clone(),
        );
        registry.register(
            "drainit_drain_waits",
            "GET /drain/wait requests ended, by outcome (over, no_drain, refused, gone)",
            metrics.drain_waits.clone(),
        );
        registry.register(
            "drainit_log_lines_dropped",
            "Log lines dropped because stderr was not read fast enough (or failed)",
            crate::log_writer::dropped_lines(),
        );
        metrics
    }

    /// Where the lifecycle state is read at each scrape (once; later calls are ignored):
    /// `drainit_lifecycle_state{state="..."}` is 1 for the phase `phase` returns and 0 for the
    /// others.
    pub fn read_phase_from(&self, phase: impl Fn() -> PhaseKind + Send + Sync + 'static) {
        let _ = self.phase.set(PhaseSource(Box::new(phase)));
    }

    /// A drain ended: `drainit_drain_duration_seconds`, and `drainit_drains_total{reason}`.
    pub fn drain_ended(&self, reason: EndReason, duration: Duration) {
        self.drain_duration.observe(duration.as_secs_f64());
        self.drains.get_or_create(&reason_labels(reason)).inc();
    }

    /// Time from the stop signal to the app's exit: `drainit_app_stop_duration_seconds`.
    pub fn app_stopped(&self, since_stop_signal: Duration) {
        self.app_stop_duration
            .observe(since_stop_signal.as_secs_f64());
    }

    /// The shutdown budget ran out and the app's group was SIGKILLed: `drainit_budget_kills_total`.
    pub fn budget_kill(&self) {
        self.budget_kills.inc();
    }

    /// A signal forwarded to the app: `drainit_signals_forwarded_total{signal="SIGHUP"}`
    /// (`SIGRTMIN+3` for a real-time one).
    pub fn signal_forwarded(&self, signal: i32) {
        let label = match self.signal_labels.get(&signal) {
            Some(label) => label.clone(),
            None => Cow::Owned(signals::name(signal)),
        };
        self.signals_forwarded
            .get_or_create(&one_label("signal", label))
            .inc();
    }

    /// Orphaned processes reaped (not the app): `drainit_zombies_reaped_total`.
    pub fn zombies_reaped(&self, count: u64) {
        self.zombies_reaped.inc_by(count);
    }

    /// A probe request answered: `drainit_probe_requests_total{path, code, checker}`. A path
    /// outside the served ones is recorded as `other`.
    pub fn probe(&self, path: &str, code: u16, checker: CheckerKind) {
        let path = PROBE_PATHS.iter().find(|p| **p == path).unwrap_or(&OTHER);
        self.probe_requests
            .get_or_create(&ProbeLabels {
                path: Cow::Borrowed(path),
                code,
                checker: Cow::Borrowed(checker.label()),
            })
            .inc();
    }

    /// One app readiness check: `drainit_app_checks_total{kind, result}` and
    /// `drainit_app_check_duration_seconds{kind}`.
    pub fn app_check(&self, kind: CheckKind, result: Verdict, duration: Duration) {
        let kind = Cow::Borrowed(kind.label());
        self.app_check_duration
            .get_or_create(&one_label("kind", kind.clone()))
            .observe(duration.as_secs_f64());
        self.app_checks
            .get_or_create(&CheckLabels {
                kind,
                result: Cow::Borrowed(result.label()),
            })
            .inc();
    }

    /// A `GET /drain/wait` ended: `drainit_drain_waits_total{outcome}`.
    pub fn drain_wait(&self, outcome: drain_wait::Outcome) {
        self.drain_wait_series(outcome).inc();
    }

    fn drain_wait_series(&self, outcome: drain_wait::Outcome) -> Counter {
        self.drain_waits
            .get_or_create(&one_label("outcome", outcome.label()))
            .clone()
    }

    /// Requests that reached the app after its stop signal: `drainit_late_arrivals_total`. A
    /// handle on the counter, for the traffic watcher to count into (it does not know
    /// [`Metrics`]).
    pub fn late_arrivals(&self) -> Counter {
        self.late_arrivals.clone()
    }

    /// The Prometheus text exposition (what GET /metrics returns), ending with `# EOF`; serve it
    /// as [`CONTENT_TYPE`].
    pub fn render(&self) -> String {
        let mut openmetrics = String::with_capacity(8 * 1024);
        {
            let _rendering = crate::sync::lock(&self.rendering);
            let phase = self
                .phase
                .get()
                .map_or(PhaseKind::Starting, |read| (read.0)());
            self.show_phase(phase);
            // Writing to a String cannot fail, and every metric here encodes.
            let _ = encode_registry(&mut openmetrics, &self.registry);
        }
        let mut text = to_prometheus_text(&openmetrics);
        text.push_str("# EOF\n");
        text
    }

    /// The state-set gauge: 1 for `current`, 0 for every other phase.
    fn show_phase(&self, current: PhaseKind) {
        for kind in PhaseKind::ALL {
            self.lifecycle_state
                .get_or_create(&one_label("state", kind.label()))
                .set(i64::from(kind == current));
        }
    }
}

fn reason_labels(reason: EndReason) -> OneLabel {
    one_label("reason", reason.label())
}

/// Turns `prometheus-client`'s OpenMetrics text (without its `# EOF`) into the Prometheus text
/// format: a counter family `foo` has samples `foo_total`, and 0.0.4 parsers expect its `# HELP`
/// and `# TYPE` lines to name `foo_total` too. Label values escape newlines, so every line that
/// starts with `#` is a descriptor line.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|kind| Some((kind, line.strip_prefix(kind)?)));
        match descriptor {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                let _ = writeln!(text, "{kind}{name}{suffix} {tail}");
            }
            None if line.starts_with("# UNIT ") => {}
            None => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Write as _};
    use std::process::{Command, Stdio};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use nix::libc::SIGHUP;

    use crate::signals::Meaning;

    /// The value of the series written exactly as `series` (name and labels, in output order).
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
    }

    fn assert_value(text: &str, series: &str, expected: f64) {
        assert_eq!(value(text, series), Some(expected), "{series} in:\n{text}");
    }

    fn states_at_one(text: &str) -> Vec<String> {
        text.lines()
            .filter(|line| line.starts_with("drainit_lifecycle_state{") && line.ends_with(" 1"))
            .map(ToOwned::to_owned)
            .collect()
    }

    /// Runs the real `promtool check metrics` on `text`, via stdin.
    fn promtool_check(text: &str) {
        let mut child = match Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                "promtool not found: install the `prometheus` Debian package (apt-get install prometheus)"
            ),
            Err(e) => panic!("cannot run promtool: {e}"),
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "promtool check metrics failed ({}):\n{}{}\non:\n{text}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }

    /// systemd's stop signal, as the app's side names it.
    const SIGRTMIN_3: i32 = 37;

    fn exercised() -> Metrics {
        let metrics = Metrics::new();
        metrics.read_phase_from(|| PhaseKind::Stopping);
        metrics.drain_ended(EndReason::Delay, Duration::from_millis(15_003));
        metrics.drain_ended(EndReason::Watchers, Duration::from_millis(400));
        metrics.drain_ended(EndReason::Cap, Duration::from_secs(400));
        metrics.app_stopped(Duration::from_millis(40));
        metrics.budget_kill();
        metrics.signal_forwarded(SIGHUP);
        metrics.signal_forwarded(SIGHUP);
        metrics.signal_forwarded(SIGRTMIN_3);
        metrics.zombies_reaped(3);
        metrics.zombies_reaped(2);
        metrics.probe("/ready", 200, CheckerKind::Kubelet);
        metrics.probe("/ready", 503, CheckerKind::LoadBalancer);
        metrics.probe("/ready", 503, CheckerKind::LoadBalancer);
        metrics.probe("/alive", 200, CheckerKind::Kubelet);
        metrics.probe("/metrics", 200, CheckerKind::Other);
        let check = |kind, verdict, ms| metrics.app_check(kind, verdict, Duration::from_millis(ms));
        check(CheckKind::Http, Verdict::Pass, 3);
        check(CheckKind::Http, Verdict::Fail, 30);
        check(CheckKind::Tcp, Verdict::Timeout, 2000);
        metrics.late_arrivals().inc_by(4);
        metrics
    }

    #[test]
    fn every_method_shows_in_the_rendered_text() {
        let text = exercised().render();
        let version = env!("CARGO_PKG_VERSION");
        assert_value(
            &text,
            &format!("drainit_build_info{{version=\"{version}\"}}"),
            1.0,
        );

        assert_eq!(
            states_at_one(&text),
            ["drainit_lifecycle_state{state=\"stopping\"} 1"]
        );
        for state in PhaseKind::ALL {
            let expected = if state == PhaseKind::Stopping {
                1.0
            } else {
                0.0
            };
            let series = format!("drainit_lifecycle_state{{state=\"{}\"}}", state.label());
            assert_value(&text, &series, expected);
        }

        assert_value(&text, "drainit_drains_total{reason=\"delay\"}", 1.0);
        assert_value(&text, "drainit_drains_total{reason=\"watchers\"}", 1.0);
        assert_value(&text, "drainit_drains_total{reason=\"cap\"}", 1.0);
        assert_value(&text, "drainit_drains_total{reason=\"floor\"}", 0.0);
        assert_value(&text, "drainit_drains_total{reason=\"interrupted\"}", 0.0);
        assert_value(&text, "drainit_drain_duration_seconds_count", 3.0);
        assert_value(&text, "drainit_drain_duration_seconds_sum", 415.403);
        assert_value(
            &text,
            "drainit_drain_duration_seconds_bucket{le=\"0.5\"}",
            1.0,
        );
        assert_value(
            &text,
            "drainit_drain_duration_seconds_bucket{le=\"15.0\"}",
            1.0,
        );
        assert_value(
            &text,
            "drainit_drain_duration_seconds_bucket{le=\"20.0\"}",
            2.0,
        );
        assert_value(
            &text,
            "drainit_drain_duration_seconds_bucket{le=\"300.0\"}",
            2.0,
        );
        assert_value(
            &text,
            "drainit_drain_duration_seconds_bucket{le=\"+Inf\"}",
            3.0,
        );

        assert_value(&text, "drainit_app_stop_duration_seconds_count", 1.0);
        assert_value(&text, "drainit_app_stop_duration_seconds_sum", 0.04);
        assert_value(
            &text,
            "drainit_app_stop_duration_seconds_bucket{le=\"0.025\"}",
            0.0,
        );
        assert_value(
            &text,
            "drainit_app_stop_duration_seconds_bucket{le=\"0.05\"}",
            1.0,
        );
        assert_value(&text, "drainit_budget_kills_total", 1.0);
        assert_value(
            &text,
            "drainit_signals_forwarded_total{signal=\"SIGHUP\"}",
            2.0,
        );
        assert_value(
            &text,
            "drainit_signals_forwarded_total{signal=\"SIGRTMIN+3\"}",
            1.0,
        );
        assert_value(&text, "drainit_zombies_reaped_total", 5.0);

        let probe = |path: &str, code: u16, checker: &str| {
            format!(
                "drainit_probe_requests_total{{path=\"{path}\",code=\"{code}\",checker=\"{checker}\"}}"
            )
        };
        assert_value(&text, &probe("/ready", 200, "kubelet"), 1.0);
        assert_value(&text, &probe("/ready", 503, "load_balancer"), 2.0);
        assert_value(&text, &probe("/alive", 200, "kubelet"), 1.0);
        assert_value(&text, &probe("/metrics", 200, "other"), 1.0);

        assert_value(
            &text,
            "drainit_app_checks_total{kind=\"http\",result=\"pass\"}",
            1.0,
        );
        assert_value(
            &text,
            "drainit_app_checks_total{kind=\"http\",result=\"fail\"}",
            1.0,
        );
        assert_value(
            &text,
            "drainit_app_checks_total{kind=\"tcp\",result=\"timeout\"}",
            1.0,
        );
        assert_value(
            &text,
            "drainit_app_check_duration_seconds_count{kind=\"http\"}",
            2.0,
        );
        assert_value(
            &text,
            "drainit_app_check_duration_seconds_bucket{le=\"0.005\",kind=\"http\"}",
            1.0,
        );
        assert_value(
            &text,
            "drainit_app_check_duration_seconds_bucket{le=\"0.05\",kind=\"http\"}",
            2.0,
        );
        assert_value(
            &text,
            "drainit_app_check_duration_seconds_bucket{le=\"1.0\",kind=\"tcp\"}",
            0.0,
        );
        assert_value(
            &text,
            "drainit_app_check_duration_seconds_bucket{le=\"2.5\",kind=\"tcp\"}",
            1.0,
        );
        assert_value(&text, "drainit_late_arrivals_total", 4.0);
    }

    #[test]
    fn the_text_is_the_prometheus_format_ending_with_eof() {
        let text = exercised().render();
        assert!(text.ends_with("\n# EOF\n"), "{text}");
        assert!(CONTENT_TYPE.starts_with("text/plain; version=0.0.4"));
        for counter in [
            "drains",
            "budget_kills",
            "signals_forwarded",
            "zombies_reaped",
            "probe_requests",
            "app_checks",
            "late_arrivals",
            "log_lines_dropped",
        ] {
            let name = format!("drainit_{counter}_total");
            assert!(
                text.contains(&format!("\n# TYPE {name} counter\n")),
                "{name}"
            );
            assert!(text.contains(&format!("\n# HELP {name} ")), "{name}");
        }
        assert!(text.starts_with("# HELP drainit_build_info "), "{text}");
        assert!(text.contains("\n# TYPE drainit_build_info gauge\n"));
        assert!(text.contains("\n# TYPE drainit_lifecycle_state gauge\n"));
        for histogram in [
            "drain_duration_seconds",
            "app_stop_duration_seconds",
            "app_check_duration_seconds",
        ] {
            let line = format!("\n# TYPE drainit_{histogram} histogram\n");
            assert!(text.contains(&line), "{histogram}");
        }
        assert!(!text.contains("# UNIT"));
        assert_eq!(text.matches("# EOF").count(), 1);
    }

    #[test]
    fn promtool_accepts_the_rendered_text() {
        promtool_check(&exercised().render());
    }

    /// Why render() rewrites the counters' descriptors: promtool reads the crate's own OpenMetrics
    /// counters as untyped `_total` series without help text. This also shows that a text promtool
    /// rejects fails the check.
    #[test]
    #[should_panic(expected = "promtool check metrics failed")]
    fn promtool_rejects_the_crates_openmetrics_counters() {
        let metrics = exercised();
        let mut openmetrics = String::new();
        prometheus_client::encoding::text::encode(&mut openmetrics, &metrics.registry).unwrap();
        assert!(openmetrics.contains("\n# TYPE drainit_drains counter\n"));
        promtool_check(&openmetrics);
    }

    #[test]
    fn promtool_accepts_a_fresh_registry() {
        let text = Metrics::new().render();
        assert_eq!(
            states_at_one(&text),
            ["drainit_lifecycle_state{state=\"starting\"} 1"]
        );
        assert_value(&text, "drainit_drain_duration_seconds_count", 0.0);
        assert_value(&text, "drainit_late_arrivals_total", 0.0);
        assert!(!text.contains("drainit_probe_requests"));
        promtool_check(&text);
    }

    #[test]
    fn unknown_paths_fold_into_other() {
        let metrics = Metrics::new();
        metrics.probe("/etc/passwd", 404, CheckerKind::Other);
        metrics.probe("/ready?x=1", 404, CheckerKind::Other);
        let text = metrics.render();
        assert_value(
            &text,
            "drainit_probe_requests_total{path=\"other\",code=\"404\",checker=\"other\"}",
            2.0,
        );
        promtool_check(&text);
    }

    /// The review's bug: the label list forgot ABRT, SYS and the real-time signals, and listed
    /// SIGTERM, which starts the drain and is never forwarded.
    #[test]
    fn every_forwarded_signal_has_its_series() {
        let metrics = Metrics::new();
        let mut forwarded = 0;
        for signal in signals::handled() {
            match signals::meaning(signal) {
                Meaning::Forward(_) | Meaning::Interrupt(_) => {}
                Meaning::Drain | Meaning::ChildExited => {
                    assert!(!metrics.signal_labels.contains_key(&signal), "{signal}");
                    continue;
                }
            }
            let label = &metrics.signal_labels[&signal];
            assert_eq!(*label, signals::name(signal));
            metrics.signal_forwarded(signal);
            forwarded += 1;
        }
        let text = metrics.render();
        for name in [
            "SIGABRT",
            "SIGSYS",
            "SIGINT",
            "SIGRTMIN",
            "SIGRTMIN+3",
            "SIGRTMAX",
        ] {
            let series = format!("drainit_signals_forwarded_total{{signal=\"{name}\"}}");
            assert_value(&text, &series, 1.0);
        }
        let series = text
            .lines()
            .filter(|line| line.starts_with("drainit_signals_forwarded_total{"));
        assert_eq!(series.count(), forwarded);
        assert_eq!(metrics.signal_labels.len(), forwarded);
        assert!(!text.contains("SIGTERM"));
        assert!(!text.contains("SIGCHLD"));
        promtool_check(&text);
    }

    #[test]
    fn the_state_is_the_lifecycles_at_each_scrape() {
        let metrics = Metrics::new();
        let phase = Arc::new(AtomicUsize::new(0));
        let current = phase.clone();
        metrics.read_phase_from(move || PhaseKind::ALL[current.load(Ordering::Relaxed)]);
        for (index, kind) in PhaseKind::ALL.into_iter().enumerate() {
            phase.store(index, Ordering::Relaxed);
            let expected = format!("drainit_lifecycle_state{{state=\"{}\"}} 1", kind.label());
            assert_eq!(states_at_one(&metrics.render()), [expected]);
        }
    }

    #[test]
    fn shared_between_threads_nothing_is_lost() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Metrics>();

        let metrics = Arc::new(Metrics::new());
        let phase = Arc::new(AtomicUsize::new(0));
        let current = phase.clone();
        metrics.read_phase_from(move || PhaseKind::ALL[current.load(Ordering::Relaxed)]);
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (metrics, phase) = (metrics.clone(), phase.clone());
                std::thread::spawn(move || {
                    for n in 0..1000 {
                        metrics.probe("/ready", 200, CheckerKind::Kubelet);
                        metrics.zombies_reaped(1);
                        phase.store((i + n) % PhaseKind::ALL.len(), Ordering::Relaxed);
                        if n % 100 == 0 {
                            assert_eq!(states_at_one(&metrics.render()).len(), 1);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let text = metrics.render();
        assert_value(
            &text,
            "drainit_probe_requests_total{path=\"/ready\",code=\"200\",checker=\"kubelet\"}",
            4000.0,
        );
        assert_value(&text, "drainit_zombies_reaped_total", 4000.0);
        assert_eq!(states_at_one(&text).len(), 1);
    }
}
