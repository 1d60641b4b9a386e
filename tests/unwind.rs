//! `panic = "unwind"` in the binaries as built: a bug in one task must unwind that task, not
//! abort the process (for drainit, PID 1 and with it the app). The static build compiles std
//! itself (docker/build-static.sh), so this is checked on what it produced: the demo app, built
//! the same way next to drainit, panics in a connection's task on `GET /panic`.

mod common;

use std::time::Duration;

use common::{Drainit, get_request, http_get, try_request};

#[test]
fn a_panicking_task_unwinds_and_the_process_goes_on_serving() {
    let drainit = Drainit::demo(&[], &[]);
    let app = drainit.app_addr();
    let answer = try_request(
        app,
        &get_request("/panic", "unwind-test"),
        Duration::from_secs(5),
    );
    assert!(answer.is_err(), "GET /panic answered: {answer:?}");
    assert_eq!(http_get(app, "/").0, 200, "the app died with its task");
    assert_eq!(drainit.get("/ready").0, 200);
    assert_eq!(drainit.count_events("app_exited"), 0);
}
