//! State shared between tasks behind a `std` mutex (never held across an await).

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`. A task that panicked while holding it (a bug) must not stop every other task
/// that reads the same state, PID 1 included: use the data as it is.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
