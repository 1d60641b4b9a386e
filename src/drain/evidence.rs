//! What a drain saw and when each watcher judged it drained, as typed facts: the drain decides
//! from the fields, and the `drain over` log line renders them as compact JSON whose keys the
//! README documents (`last_request_ms`, `traffic_drained_ms`, ...).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::arrivals::RateSource;

/// A source of evidence that the drain is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Watcher {
    /// No new connection and no inbound bytes on the app's ports for the quiet period.
    Traffic,
    /// Every load balancer checking `/ready` has seen it fail, or stopped checking.
    LbProbes,
}

impl Watcher {
    /// The evidence key of when this watcher became drained.
    fn drained_key(self) -> &'static str {
        match self {
            Watcher::Traffic => "traffic_drained_ms",
            Watcher::LbProbes => "lb_probes_drained_ms",
        }
    }
}

impl FromStr for Watcher {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "traffic" => Ok(Watcher::Traffic),
            "lb-probes" => Ok(Watcher::LbProbes),
            other => Err(format!(
                "unknown drain watcher '{other}': use traffic, lb-probes or both, comma-separated"
            )),
        }
    }
}

impl fmt::Display for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Watcher::Traffic => "traffic",
            Watcher::LbProbes => "lb-probes",
        })
    }
}

/// The evidence behind the end of a drain, whatever its policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evidence {
    #[serde(flatten)]
    pub seen: Seen,
    /// Only for a watched drain that ran to its verdict.
    #[serde(flatten)]
    pub judged: Option<Judged>,
}

/// What was seen of load balancers and requests around the drain, in every mode: times in ms
/// since the drain began, negative before it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Seen {
    /// Load balancers checking `/ready` around the drain.
    pub load_balancers: usize,
    pub last_lb_probe_ms: Option<i64>,
    pub last_request_ms: Option<i64>,
    pub last_new_connection_ms: Option<i64>,
    pub open_connections: usize,
    /// The last arrival on the app's own ports: from its sockets' ages, or a new connection to
    /// them. `last_request_ms` also counts what could not be attributed (see below).
    pub last_app_arrival_ms: Option<i64>,
    /// How `last_request_ms` was measured: `socket_ages` (when the data arrived, to a jiffy),
    /// or `readings` (only known to be between two readings: taken at the later one).
    pub last_request_measured_by: Option<LastRequestSource>,
    /// Connections accepted during the drain that no socket explained (short ones, come and
    /// gone between two readings): counted as the app's, at the reading that saw them.
    pub unattributed_connections: u64,
}

/// How the last request's time was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LastRequestSource {
    SocketAges,
    Readings,
}

/// What a watched drain was judged on: its bounds, the quiet period, the load balancers still
/// pending and when each watcher became drained.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judged {
    #[serde(rename = "drain_min_ms", serialize_with = "millis")]
    pub min: Duration,
    #[serde(rename = "drain_max_ms", serialize_with = "millis")]
    pub max: Duration,
    /// With the `traffic` watcher.
    #[serde(flatten)]
    pub quiet: Option<Quiet>,
    /// With the `lb-probes` watcher: `address User-Agent` of each.
    #[serde(
        rename = "lb_checkers_pending",
        skip_serializing_if = "Option::is_none"
    )]
    pub pending_checkers: Option<Vec<String>>,
    #[serde(flatten)]
    pub drained: DrainedAt,
    /// For a drain the watchers ended: from the last request to the end.
    #[serde(
        rename = "last_request_margin_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub margin_ms: Option<i64>,
}

/// The quiet period a drain judges traffic against, and why that long.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quiet {
    #[serde(rename = "quiet_period_ms", serialize_with = "millis")]
    pub period: Duration,
    #[serde(rename = "quiet_period_reason")]
    pub reason: String,
    /// The arrival rate before the drain, and how it was measured (see `drain::arrivals`).
    #[serde(rename = "arrival_rate_per_s")]
    pub rate_per_s: Option<f64>,
    #[serde(rename = "arrival_rate_measured_by")]
    pub rate_measured_by: Option<RateSource>,
}

/// When each watcher became drained, into the drain (the last time, if it changed its mind);
/// `None` while it is not.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainedAt(Vec<(Watcher, Option<Duration>)>);

impl DrainedAt {
    pub fn new(watchers: &[Watcher]) -> Self {
        Self(watchers.iter().map(|w| (*w, None)).collect())
    }

    /// Takes in each watcher's verdict `elapsed` into the drain; returns whether all are drained.
    pub fn update(&mut self, elapsed: Duration, mut drained: impl FnMut(Watcher) -> bool) -> bool {
        let mut all = true;
        for (watcher, at) in &mut self.0 {
            let now_drained = drained(*watcher);
            // A watcher can change its mind (traffic came back): keep when it last became drained.
            *at = now_drained.then(|| at.unwrap_or(elapsed));
            all &= now_drained;
        }
        all
    }

    /// Since when `watcher` is drained; `None` when it is not, or is not watched.
    pub fn since(&self, watcher: Watcher) -> Option<Duration> {
        self.0.iter().find(|(w, _)| *w == watcher)?.1
    }

    /// Whether `watcher` is drained; `None` when it is not watched.
    pub fn verdict(&self, watcher: Watcher) -> Option<bool> {
        self.0
            .iter()
            .find(|(w, _)| *w == watcher)
            .map(|(_, at)| at.is_some())
    }
}

impl Serialize for DrainedAt {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (watcher, at) in &self.0 {
            map.serialize_entry(watcher.drained_key(), &at.map(as_millis))?;
        }
        map.end()
    }
}

impl Seen {
    /// Requests arrived during the drain, not merely before it (too few to size a period).
    pub fn requests_while_draining(&self) -> bool {
        self.last_request_ms.is_some_and(|ms| ms >= 0)
    }
}

impl Evidence {
    /// Whether a watched drain judged `watcher` drained at its end.
    pub fn drained(&self, watcher: Watcher) -> bool {
        self.judged
            .as_ref()
            .is_some_and(|judged| judged.drained.since(watcher).is_some())
    }
}

/// Compact JSON, keys in alphabetical order (the log's `evidence` field).
impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_value(self).map_err(|_| fmt::Error)?;
        write!(f, "{json}")
    }
}

pub(crate) fn as_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Serializes a duration as whole milliseconds.
pub(crate) fn millis<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(as_millis(*duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn seen() -> Seen {
        Seen {
            load_balancers: 2,
            last_lb_probe_ms: Some(-150),
            last_request_ms: Some(1050),
            last_new_connection_ms: None,
            open_connections: 3,
            last_app_arrival_ms: Some(1050),
            last_request_measured_by: Some(LastRequestSource::SocketAges),
            unattributed_connections: 0,
        }
    }

    #[test]
    fn watcher_names() {
        assert_eq!("traffic".parse(), Ok(Watcher::Traffic));
        assert_eq!(" lb-probes".parse(), Ok(Watcher::LbProbes));
        assert!(
            "endpoints"
                .parse::<Watcher>()
                .unwrap_err()
                .contains("use traffic, lb-probes")
        );
    }

    #[test]
    fn a_drain_with_no_verdict_shows_what_was_seen() {
        let evidence = Evidence {
            seen: seen(),
            judged: None,
        };
        assert_eq!(
            evidence.to_string(),
            concat!(
                r#"{"last_app_arrival_ms":1050,"last_lb_probe_ms":-150,"last_new_connection_ms":null,"#,
                r#""last_request_measured_by":"socket_ages","last_request_ms":1050,"load_balancers":2,"#,
                r#""open_connections":3,"unattributed_connections":0}"#
            )
        );
    }

    #[test]
    fn a_watched_drain_shows_its_bounds_quiet_period_and_verdicts() {
        let mut drained = DrainedAt::new(&[Watcher::LbProbes, Watcher::Traffic]);
        drained.update(MS(300), |w| w == Watcher::LbProbes);
        let evidence = Evidence {
            seen: seen(),
            judged: Some(Judged {
                min: MS(2000),
                max: MS(30_000),
                quiet: Some(Quiet {
                    period: MS(1500),
                    reason: "fixed by --quiet-period".into(),
                    rate_per_s: Some(12.5),
                    rate_measured_by: Some(RateSource::SocketAges),
                }),
                pending_checkers: Some(vec!["10.0.0.1 HAProxy".into()]),
                drained,
                margin_ms: Some(1010),
            }),
        };
        assert_eq!(
            evidence.to_string(),
            concat!(
                r#"{"arrival_rate_measured_by":"socket_ages","arrival_rate_per_s":12.5,"#,
                r#""drain_max_ms":30000,"drain_min_ms":2000,"last_app_arrival_ms":1050,"#,
                r#""last_lb_probe_ms":-150,"last_new_connection_ms":null,"#,
                r#""last_request_margin_ms":1010,"last_request_measured_by":"socket_ages","#,
                r#""last_request_ms":1050,"#,
                r#""lb_checkers_pending":["10.0.0.1 HAProxy"],"lb_probes_drained_ms":300,"#,
                r#""load_balancers":2,"open_connections":3,"quiet_period_ms":1500,"#,
                r#""quiet_period_reason":"fixed by --quiet-period","traffic_drained_ms":null,"#,
                r#""unattributed_connections":0}"#
            )
        );
        assert!(evidence.drained(Watcher::LbProbes));
        assert!(!evidence.drained(Watcher::Traffic));
    }

    #[test]
    fn only_the_watchers_in_use_have_keys() {
        let drained = DrainedAt::new(&[Watcher::LbProbes]);
        let json = serde_json::to_value(Judged {
            min: MS(0),
            max: MS(1000),
            quiet: None,
            pending_checkers: None,
            drained,
            margin_ms: None,
        })
        .unwrap();
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["drain_max_ms", "drain_min_ms", "lb_probes_drained_ms"]
        );
    }

    #[test]
    fn a_watcher_that_changes_its_mind_is_drained_from_the_last_time() {
        let mut drained = DrainedAt::new(&[Watcher::Traffic]);
        assert!(drained.update(MS(100), |_| true));
        assert!(drained.update(MS(200), |_| true));
        assert_eq!(drained.since(Watcher::Traffic), Some(MS(100)));
        assert!(!drained.update(MS(300), |_| false));
        assert_eq!(drained.verdict(Watcher::Traffic), Some(false));
        drained.update(MS(400), |_| true);
        assert_eq!(drained.since(Watcher::Traffic), Some(MS(400)));
        assert_eq!(drained.verdict(Watcher::LbProbes), None, "not watched");
    }
}
