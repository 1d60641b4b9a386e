//! The gate task on tokio's paused clock: what it decides and when, in no real time.

use std::net::IpAddr;

use tokio::task::JoinHandle;

use super::*;
use crate::checkers::CheckerId;
use crate::lifecycle::Gate;

const GATE: StartupGate = StartupGate {
    probes: 2,
    timeout: Duration::from_secs(90),
};
// Off the gate's own rhythm, so that only the notification can explain a prompt verdict.
const PROBE_EVERY: Duration = Duration::from_millis(700);

/// The gate task with what it reads and where it reports.
struct Rig {
    checkers: Arc<Mutex<Checkers>>,
    recorded: Arc<Notify>,
    state: watch::Sender<State>,
    verdicts: mpsc::Receiver<Event>,
    task: JoinHandle<()>,
}

impl Rig {
    fn start(state: State) -> Self {
        let checkers = Arc::<Mutex<Checkers>>::default();
        let recorded = Arc::new(Notify::new());
        let state = watch::Sender::new(state);
        let (events, verdicts) = mpsc::channel(1);
        let task = tokio::spawn(run(
            GATE,
            checkers.clone(),
            recorded.clone(),
            state.subscribe(),
            events,
        ));
        Self {
            checkers,
            recorded,
            state,
            verdicts,
            task,
        }
    }

    /// A load balancer's `/ready` check answered 200, as the probe server records it.
    fn probe(&self, agent: &str) {
        let id = CheckerId::new(IpAddr::from([10, 0, 0, 1]), agent);
        crate::sync::lock(&self.checkers).record(id, Instant::now(), true, false);
        self.recorded.notify_one();
    }

    async fn verdict(&mut self) -> GateVerdict {
        match self.verdicts.recv().await {
            Some(Event::Gate(verdict)) => verdict,
            other => panic!("expected a gate verdict, got {other:?}"),
        }
    }
}

fn ready_holding(since: Instant) -> State {
    State::Ready {
        since,
        gate: Gate::Holding,
    }
}

#[tokio::test(start_paused = true)]
async fn opens_at_the_check_that_completes_it() {
    let mut rig = Rig::start(ready_holding(Instant::now()));
    // A load balancer is credible after a few steady probes; two 200s in a row open the gate.
    for _ in 0..3 {
        tokio::time::sleep(PROBE_EVERY).await;
        rig.probe("HAProxy");
    }
    let completed = Instant::now();
    assert_eq!(rig.verdict().await, GateVerdict::Opened { probes: 2 });
    assert_eq!(Instant::now(), completed, "at once, not at the next look");
    rig.state.send_replace(State::Ready {
        since: completed,
        gate: Gate::Open,
    });
    rig.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn times_out_when_no_load_balancer_confirms() {
    let since = Instant::now();
    let mut rig = Rig::start(ready_holding(since));
    // A tool's checks do not count.
    rig.probe("curl/8.5.0");
    let verdict = rig.verdict().await;
    assert_eq!(Instant::now() - since, GATE.timeout);
    assert_eq!(
        verdict,
        GateVerdict::TimedOut {
            timeout: GATE.timeout,
            waiting_for: vec![],
        }
    );
}

#[tokio::test(start_paused = true)]
async fn the_timeout_counts_from_the_last_time_the_app_became_ready() {
    let mut rig = Rig::start(State::new(Gate::Holding));
    tokio::time::sleep(GATE.timeout * 2).await;
    assert!(
        rig.verdicts.try_recv().is_err(),
        "nothing to open before ready"
    );
    let since = Instant::now();
    rig.state.send_replace(ready_holding(since));
    tokio::time::sleep(GATE.timeout / 2).await;
    rig.state.send_replace(State::Unready {
        gate: Gate::Holding,
    });
    tokio::time::sleep(GATE.timeout).await;
    assert!(
        rig.verdicts.try_recv().is_err(),
        "nothing to open while unready"
    );
    let again = Instant::now();
    rig.state.send_replace(ready_holding(again));
    assert!(matches!(rig.verdict().await, GateVerdict::TimedOut { .. }));
    assert_eq!(Instant::now() - again, GATE.timeout);
}

#[tokio::test(start_paused = true)]
async fn a_verdict_is_sent_once_until_the_lifecycle_takes_it() {
    let since = Instant::now();
    let mut rig = Rig::start(ready_holding(since));
    assert!(matches!(rig.verdict().await, GateVerdict::TimedOut { .. }));
    tokio::time::sleep(GATE.timeout).await;
    assert!(rig.verdicts.try_recv().is_err(), "no second verdict");
}

#[tokio::test(start_paused = true)]
async fn ends_when_the_drain_starts() {
    let rig = Rig::start(ready_holding(Instant::now()));
    let (draining, _) = crate::lifecycle::step(
        *rig.state.borrow(),
        Event::Sigterm(crate::lifecycle::DrainFacts {
            had_traffic: true,
            kill_after: Duration::from_secs(29),
            mode: crate::lifecycle::Mode::Wrapper,
        }),
        Instant::now(),
    );
    rig.state.send_replace(draining);
    rig.task.await.unwrap();
}
