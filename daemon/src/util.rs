//! Two helpers every part of the daemon uses: a lock that survives a poisoned mutex, and the
//! wall clock in unix milliseconds. They depend on nothing else in the daemon.

use std::sync::{Mutex, MutexGuard};

/// Now, in unix milliseconds.
pub(crate) fn unix_ms_now() -> u64 {
    outcome_log::now_ms().max(0) as u64
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every critical section
    // is a few assignments), so a poisoned lock is taken over.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
