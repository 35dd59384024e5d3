//! Source health: logged once per failure with its cause, retried with backoff, stoppable sleeps.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Locks a mutex, taking the data even if a panicking thread poisoned it (the data are plain
/// latest values, always left consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Health of one source (a camera view, the audio input, the energy meter).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Health {
    /// True while the source delivers.
    pub up: bool,
    /// Why the source is down (the last failure's cause).
    pub cause: Option<String>,
    /// How many times the source went from up (or never started) to down.
    pub failures: u64,
    /// How many times it came back after a failure.
    pub recoveries: u64,
}

impl Health {
    /// Records a failure; logs it only when the source was up or the cause changed.
    pub(crate) fn fail(&mut self, source: &str, cause: String) {
        if self.up || self.cause.as_deref() != Some(cause.as_str()) {
            if self.up || self.cause.is_none() {
                self.failures += 1;
            }
            tracing::warn!(source, cause = %cause, "sensing source unavailable");
        }
        self.up = false;
        self.cause = Some(cause);
    }

    /// Records that the source delivers; logs a recovery after a failure.
    pub(crate) fn ok(&mut self, source: &str) {
        if !self.up {
            if self.cause.is_some() {
                self.recoveries += 1;
                tracing::info!(source, "sensing source recovered");
            }
            self.up = true;
            self.cause = None;
        }
    }
}

/// Exponential backoff between retries of a failed source.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(initial_ms: u64, max_ms: u64) -> Self {
        let initial = Duration::from_millis(initial_ms.max(1));
        Backoff { initial, max: Duration::from_millis(max_ms.max(initial_ms).max(1)), next: initial }
    }
    /// The delay before the next retry; doubles each call up to the maximum.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// A stop flag that sleeping worker threads wake up on.
#[derive(Debug, Default)]
pub(crate) struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    pub(crate) fn stop(&self) {
        *lock(&self.stopped) = true;
        self.wake.notify_all();
    }
    pub(crate) fn is_stopped(&self) -> bool {
        *lock(&self.stopped)
    }
    /// Sleeps for `d` or until stopped; returns true when stopped.
    pub(crate) fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut stopped = lock(&self.stopped);
        while !*stopped {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            stopped =
                self.wake.wait_timeout(stopped, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_cause_counts_once_and_recovery_is_counted() {
        let mut h = Health::default();
        h.fail("s", "gone".into());
        h.fail("s", "gone".into());
        h.fail("s", "gone".into());
        assert_eq!((h.up, h.failures), (false, 1));
        h.ok("s");
        h.ok("s");
        assert_eq!((h.up, h.recoveries, h.cause.clone()), (true, 1, None));
        h.fail("s", "gone".into());
        assert_eq!(h.failures, 2);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(100, 350);
        let ms: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }

    #[test]
    fn stop_wakes_a_sleeper() {
        let s = std::sync::Arc::new(Stop::default());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.sleep(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(20));
        s.stop();
        assert!(t.join().unwrap_or(false));
        assert!(s.is_stopped());
    }
}
