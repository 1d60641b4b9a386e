//! The one way drainit starts a task, and runs blocking work off the async thread.

use std::any::Any;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::{JoinError, JoinHandle};

/// A task as tokio sees it: one boxed type for every task drainit starts.
type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Starts `task` on the runtime.
// tokio builds its task machinery once per future type: one type, not one per task, is 34 KiB less.
#[track_caller]
pub fn spawn(task: impl Future<Output = ()> + Send + 'static) -> JoinHandle<()> {
    let task: Task = Box::pin(task);
    tokio::spawn(task)
}

/// Blocking work as tokio sees it: one boxed type whatever it returns.
type Work = Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>;

/// Runs `work` on tokio's blocking threads; awaiting the handle gives its result.
// One type whatever the result, for the same reason as `spawn`: 6 KiB less.
#[track_caller]
pub fn spawn_blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Blocking<T> {
    let work: Work = Box::new(move || Box::new(work()));
    Blocking {
        handle: tokio::task::spawn_blocking(work),
        result: PhantomData,
    }
}

/// Blocking work under way. Dropping it lets the work finish unseen.
pub struct Blocking<T> {
    handle: JoinHandle<Box<dyn Any + Send>>,
    result: PhantomData<fn() -> T>,
}

impl<T: 'static> Future for Blocking<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.handle)
            .poll(cx)
            .map(|done| done.map(|result| *result.downcast().expect("the work returns a T")))
    }
}
