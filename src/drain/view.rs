//! What the drain decided, or before it starts what it would be judged on, published through a
//! `watch` channel: `/status` renders it and never judges anything itself.

use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::evidence::{Quiet, Watcher, as_millis, millis};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrainView {
    pub policy: PolicyView,
    pub traffic: TrafficVerdict,
    pub lb_probes: LbVerdict,
}

/// The drain policy as configured (`/status`'s `drain_policy`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PolicyView {
    Fixed {
        #[serde(rename = "fixed_delay_ms", serialize_with = "millis")]
        delay: Duration,
    },
    Watched {
        watch: Vec<Watcher>,
        #[serde(rename = "min_ms", serialize_with = "millis")]
        min: Duration,
        #[serde(rename = "max_ms", serialize_with = "millis")]
        max: Duration,
    },
}

/// The `traffic` watcher's part: the quiet period (null without the watcher), and once the drain
/// has started whether traffic was quiet for it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrafficVerdict {
    /// Resolved from the rate before the drain (before it, from the rate so far).
    pub quiet: Option<Quiet>,
    pub drained: Option<bool>,
}

impl Serialize for TrafficVerdict {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        let quiet = self.quiet.as_ref();
        map.serialize_entry("quiet_period_ms", &quiet.map(|q| as_millis(q.period)))?;
        map.serialize_entry("quiet_period_reason", &quiet.map(|q| &q.reason))?;
        map.serialize_entry("arrival_rate_per_s", &quiet.and_then(|q| q.rate_per_s))?;
        map.serialize_entry(
            "arrival_rate_measured_by",
            &quiet.and_then(|q| q.rate_measured_by),
        )?;
        if let Some(drained) = self.drained {
            map.serialize_entry("drained", &drained)?;
        }
        map.end()
    }
}

/// The `lb-probes` watcher's part.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LbVerdict {
    /// With the `lb-probes` watcher: the consecutive 503s a load balancer must see.
    pub unhealthy_threshold: Option<u32>,
    /// With the `lb-probes` watcher, once the drain has started: every load balancer is done.
    pub drained: Option<bool>,
    /// What each checker's state is shown against: the threshold in use, or the default one
    /// (with a fixed delay the states still tell whether it was long enough).
    #[serde(skip)]
    pub states_against: u32,
}
